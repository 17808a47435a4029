"""Where a host's ban state lives: the shared-memory table and event counters
under `state_dir` (named by size, so a reload that resizes them starts new files
instead of truncating ones that old nodes still map), and the JSON snapshot that
carries bans over a restart or a resize."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from ..config import Config
from .ban_counters import EventCounters
from .ban_table import BanTable

COUNTER_SLOTS = 16384


def table_path(cfg: Config) -> Path:
    return cfg.state_dir / f"bans2-{cfg.ban.table_size}.shm"  # 2: the layout with a change log


def counters_path(cfg: Config) -> Path:
    return cfg.state_dir / f"ban-counters-{COUNTER_SLOTS}.shm"


def snapshot_path(cfg: Config) -> Path:
    return cfg.state_dir / "bans.json"


def create_tables(cfg: Config) -> tuple[BanTable, EventCounters]:
    """The supervisor's call: reuse compatible files (bans survive a restart), else new ones."""
    return (
        BanTable(table_path(cfg), cfg.ban.table_size, create=True),
        EventCounters(counters_path(cfg), COUNTER_SLOTS, create=True),
    )


def open_tables(cfg: Config) -> tuple[BanTable, EventCounters]:
    return BanTable(table_path(cfg), cfg.ban.table_size), EventCounters(counters_path(cfg), COUNTER_SLOTS)


def host_id(cfg: Config) -> str:
    """This host's name in the cluster: random, kept in state_dir (hostnames repeat,
    e.g. network namespaces on one machine)."""
    path = cfg.state_dir / "host-id"
    try:
        hid = path.read_text().strip()
        if 4 <= len(hid) <= 32:
            return hid
    except OSError:
        pass
    hid = f"{socket.gethostname()[:16]}-{os.urandom(4).hex()}"
    with contextlib.suppress(OSError):
        path.write_text(hid + "\n")
    return hid
