"""One supervisor per state folder.

Two supervisors on one `state_dir` would share its pid file, control socket,
shared-memory tables and host id: the second overwrote the first's pid file and
control socket, so `status` and `stop` reached the newcomer and the first kept
serving unmanaged. `start` therefore takes an flock on `state_dir/supervisor.lock`
before it binds anything; the kernel drops it when the last process holding the
open file (the supervisor, and its nodes, which inherit it across fork) exits, so
a crash never leaves it taken."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "supervisor.lock"


class AlreadyRunning(Exception):
    pass


def hold(state_dir: Path, pid_file: Path) -> int:
    """Take the state folder's lock (the descriptor stays open for the process's life),
    or raise AlreadyRunning saying which supervisor has it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)  # read-only: flock needs no more
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            pid = pid_file.read_text().strip()
        except OSError:
            pid = "?"
        raise AlreadyRunning(
            f"a supervisor is already running on state_dir {state_dir} (pid {pid}): "
            "`ftpcluster stop` it first, or give this one its own [server] state_dir"
        ) from None
    return fd
