"""Placeholder until the supervisor lands: binds and runs one node in-process."""

from __future__ import annotations

import sys

from ..bootstrap import prepare
from ..config import Config
from ..worker.node import NodeContext, run_node
from .listeners import BindError, bind_all


def start(cfg: Config, daemon: bool = False) -> int:
    prepare(cfg)
    try:
        socks = bind_all(cfg)
    except BindError as e:
        print(f"ftpcluster: {e}", file=sys.stderr)
        return 1
    ctx = NodeContext(node_id=1, config=cfg, control_sock=socks["control"], implicit_tls_sock=socks.get("implicit_tls"))
    return run_node(ctx)
