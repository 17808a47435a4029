"""Each node re-reads the users file by itself when it changes, so `ftpcluster user
add` (or a users file that configuration management pushes to every host) works
without a reload. A file that does not parse is logged and the users a node
already has stay: a half-edited file never locks everyone out."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
import structlog

from ..users import UserError, load_users
from .node_api import NodeCore

log = structlog.get_logger("ftpcluster.users")
INTERVAL = 1.0  # seconds between stat() calls: a change is live within about 1-2 s


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


async def watch_users(server: NodeCore, interval: float = INTERVAL) -> None:
    path = server.cfg.resolve(server.cfg.server.users_file)
    seen = _signature(path)
    while not server.stopped.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.stopped.wait(), interval)
        sig = _signature(path)
        if sig == seen:
            continue
        seen = sig
        try:
            users = load_users(path)
        except (UserError, OSError, ValueError) as e:
            log.error("users file not reloaded, keeping the previous users", file=str(path), error=str(e))
            continue
        # Same Authenticator: its cache is keyed by the stored hash, so a changed password misses.
        server.auth.users = users
        log.info("users file reloaded", file=str(path), users=len(users))
