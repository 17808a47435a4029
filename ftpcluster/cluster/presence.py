"""Who is connected on this host right now, for the per-host and per-user limits
(`max_connections_per_host`, `max_clients_per_host`, `max_clients_per_user`,
`max_hosts_per_user`), shared by the nodes without a lock.

Each node owns one region of a shared file (its node-table slot) and is its
only writer: an open-addressing table of (key digest, count). A reader sums a
key over the regions marked active in the header bitmap. A node clears its
region when it starts; the supervisor clears it when it reaps the node, so a
node killed with SIGKILL leaves no stale counts. Only the bitmap is written
by several processes, under an fcntl lock (the kernel frees it on death).

`max_hosts_per_user` sums per-node counts of distinct hosts, so a host whose
sessions for one user sit on two nodes counts twice: it may refuse slightly
early, never late."""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from pathlib import Path

from .shm_file import map_shared

MAGIC = b"FTPCPRS1"
HEADER = struct.Struct("<8sII32s")  # magic, regions, entries per region, active bitmap
ENTRY = struct.Struct("<QI4x")
MAX_PROBE = 64


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest(), "little") or 1


class Presence:
    def __init__(self, path: Path, regions: int = 256, entries: int = 2048, create: bool = False) -> None:
        self.path = Path(path)
        self.regions, self.entries = regions, entries
        self.region_size = entries * ENTRY.size
        size = 4096 + regions * self.region_size
        self.mm, self.fd = map_shared(self.path, size, create, wipe=True, mismatch="presence table of another size")
        if create:
            HEADER.pack_into(self.mm, 0, MAGIC, regions, entries, bytes(32))

    # ------------------------------------------------------------ regions
    def _set_active(self, region: int, on: bool) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, HEADER.size, 0, os.SEEK_SET)
        try:
            magic, r, e, bitmap = HEADER.unpack_from(self.mm, 0)
            bits = int.from_bytes(bitmap, "little")
            bits = bits | (1 << region) if on else bits & ~(1 << region)
            HEADER.pack_into(self.mm, 0, magic, r, e, bits.to_bytes(32, "little"))
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, HEADER.size, 0, os.SEEK_SET)

    def clear(self, region: int) -> None:
        """Forget a region's counts and mark it inactive (node gone)."""
        self._set_active(region, False)
        off = 4096 + region * self.region_size
        self.mm[off : off + self.region_size] = bytes(self.region_size)

    def activate(self, region: int) -> None:
        off = 4096 + region * self.region_size
        self.mm[off : off + self.region_size] = bytes(self.region_size)
        self._set_active(region, True)

    def _active(self) -> list[int]:
        bits = int.from_bytes(HEADER.unpack_from(self.mm, 0)[3], "little")
        out = []
        while bits:
            low = bits & -bits
            out.append(low.bit_length() - 1)
            bits ^= low
        return out

    # ------------------------------------------------------------ counts
    def _find(self, region: int, d: int, insert: bool) -> int | None:
        base = 4096 + region * self.region_size
        reuse = None
        for i in range(MAX_PROBE):
            off = base + ((d + i) % self.entries) * ENTRY.size
            key, count = ENTRY.unpack_from(self.mm, off)
            if key == d:
                return off
            if key == 0:
                return (reuse if reuse is not None else off) if insert else None
            if insert and count == 0 and reuse is None:
                reuse = off
        return reuse if insert else None

    def add(self, region: int, key: str, n: int) -> None:
        """Only the region's own node calls this."""
        d = _digest(key)
        off = self._find(region, d, insert=n > 0)
        if off is None:
            return
        _, count = ENTRY.unpack_from(self.mm, off)
        ENTRY.pack_into(self.mm, off, d, max(0, count + n))

    def total(self, key: str) -> int:
        d = _digest(key)
        total = 0
        for region in self._active():
            off = self._find(region, d, insert=False)
            if off is not None:
                total += ENTRY.unpack_from(self.mm, off)[1]
        return total

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)
