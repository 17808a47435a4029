"""Process-tree memory from /proc (psutil is not a dependency): the servers we
compare fork (ProFTPD per session, pyftpdlib and ftpcluster per worker), so a
server's footprint is the sum over its whole tree."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # comm may hold spaces and parens: fields start after the last ')'.
        rest = stat[stat.rfind(")") + 2 :].split()
        out[int(d.name)] = int(rest[1])
    return out


def tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = [], [root]
    while todo and len(seen) < 100_000:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return [p for p in seen if Path(f"/proc/{p}").exists()]


def _kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_kb(root: int) -> dict[str, int]:
    """Sum of RSS and of PSS (shared pages split between sharers) over the tree."""
    pids = tree(root)
    rss = sum(_kb(f"/proc/{p}/status", "VmRSS") for p in pids)
    pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
    return {"rss_kb": rss, "pss_kb": pss, "processes": len(pids)}


def raise_nofile(want: int) -> int:
    """Raise the soft fd limit (inherited by the servers we start); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
        if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and want > hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            except (ValueError, OSError):
                pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(root: int) -> float:
    """CPU time of the tree: each live process's own time plus what it reaped from
    children that already exited (ProFTPD's per-session processes)."""
    total = 0
    for pid in tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rfind(")") + 2 :].split()
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
    return total / _TICK


def self_cpu_seconds() -> float:
    """This process's CPU time (the load generator's side)."""
    t = os.times()
    return t.user + t.system
