"""Helpers for supervisor tests: status over the control socket, node pids, waiting."""

from __future__ import annotations

import ftplib
import os
import re
import time
from typing import Any, Callable

from .support_server import Server


def status(srv: Server) -> dict[str, Any]:
    return srv.status(timeout=20)


def node_pids(srv: Server) -> dict[int, int]:
    return {n["id"]: n["pid"] for n in status(srv)["nodes"] if n["state"] == "accepting"}


def wait_for(pred: Callable[[], Any], timeout: float = 15, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def session_pid(f: ftplib.FTP) -> int:
    """The pid of the node serving this session (STAT names it)."""
    text = f.sendcmd("STAT")
    m = re.search(r"Session \d+-(\d+)-\d+", text)
    assert m, text
    return int(m.group(1))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sessions_on_every_node(srv: Server, count: int, max_tries: int = 200) -> dict[int, list[ftplib.FTP]]:
    """Open logged-in sessions until every accepting node has at least `count`."""
    pids = set(node_pids(srv).values())
    by_pid: dict[int, list[ftplib.FTP]] = {p: [] for p in pids}
    spare: list[ftplib.FTP] = []
    for _ in range(max_tries):
        if all(len(v) >= count for v in by_pid.values()):
            break
        f = srv.ftp()
        pid = session_pid(f)
        (by_pid[pid] if pid in by_pid and len(by_pid[pid]) < count else spare).append(f)
    for f in spare:
        f.close()
    assert all(len(v) >= count for v in by_pid.values()), {p: len(v) for p, v in by_pid.items()}
    return by_pid


def ready_status(srv: Server, nodes: int) -> dict[str, Any]:
    """Status once exactly `nodes` nodes accept."""

    def ok() -> dict[str, Any] | None:
        st = status(srv)
        good = len(st["nodes"]) == nodes and all(n["state"] == "accepting" for n in st["nodes"])
        return st if good else None

    return wait_for(ok, what=f"{nodes} accepting nodes")
