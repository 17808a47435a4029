"""The supervisor's pid file in the state folder (`ftpcluster stop/reload` without
the control socket read it): written atomically, removed only while it is ours."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_pidfile(path: Path, pid: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def remove_pidfile(path: Path, pid: int) -> None:
    """Remove it unless another supervisor has written its own since."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip() == str(pid):
            path.unlink()
