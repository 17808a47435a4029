"""Opening a host's shared-memory file: one place for the create/size/map dance
the shared tables (ban table, counters, presence, TLS session cache) all do."""

from __future__ import annotations

import mmap
import os
from pathlib import Path


def map_shared(path: Path, size: int, create: bool, wipe: bool, mismatch: str) -> tuple[mmap.mmap, int]:
    """Map `path` (exactly `size` bytes) shared; returns the mapping and an fd kept
    open for fcntl locks. `create` makes or resizes the file; with `wipe` it starts
    from zeros (a cache), without it keeps what is there (bans survive a restart).
    Opening an existing file of another size raises ValueError(f"{path}: {mismatch}")."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | os.O_CLOEXEC, 0o600)
    try:
        if create:
            if wipe:
                os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size != size:
            raise ValueError(f"{path}: {mismatch}")
        return mmap.mmap(fd, size), os.dup(fd)
    finally:
        os.close(fd)
