"""Slot budgets shared by the nodes of one host, in shared memory.

The same leasing as cluster/rate_lease.py (a budget per slot, pieces taken
until it is spent), for what one host must hold on its own: the `host_*_rate`
caps, and a user's rate when there is no memcached or it does not answer (the
host's share of it). A small open-addressing table of (key hash, slot, bytes
taken), one flock around each lease: a few microseconds, a few times per slot
per node, so it is done right on the event loop."""

from __future__ import annotations

import fcntl
import hashlib
import struct
from pathlib import Path

from .shm_file import map_shared

ENTRIES = 4096
PROBES = 16
_REC = struct.Struct("<QqQ")  # key hash (0 = free), slot, bytes taken


class HostLeases:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.map, self.fd = map_shared(path, ENTRIES * _REC.size, create=True, wipe=False,
                                       mismatch="not a rate table of this version")  # fmt: skip

    def take(self, name: str, slot: int, budget: int, want: int) -> int | None:
        """Bytes granted out of this host's `budget` for the slot; None when the table is full."""
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") or 1
        m, size = self.map, _REC.size
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            for i in range(PROBES):
                off = ((key + i) % ENTRIES) * size
                k, s, taken = _REC.unpack_from(m, off)
                if k == key and s == slot:
                    _REC.pack_into(m, off, key, slot, taken + want)
                    break
                if k == key or k == 0 or s < slot - 2:  # this key's last slot, free, or a slot long gone
                    _REC.pack_into(m, off, key, slot, want)
                    taken = 0
                    break
            else:
                return None
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return max(0, min(want, budget - taken))
