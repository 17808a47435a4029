"""Ban-rule event counters shared by the nodes of a host, with a sliding window.

ProFTPD counts in a fixed window that starts at the first event, so an attacker
who knows the window can time bursts across its edge. Here each counter is a
ring of 8 buckets of window/8: the count is the sum of the last 8 buckets, so
the window slides in steps of an eighth and a burst cannot hide in a reset.

A set-associative table in a shared file: the key's digest picks a set of 4
slots; a writer takes an fcntl lock on that set's bytes only (the kernel drops
it if the writer dies), so nodes counting different keys never wait on each
other. When a set is full the slot idle longest is reused."""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import time
from pathlib import Path

from .shm_file import map_shared

MAGIC = b"FTPCCNT1"
HEADER = struct.Struct("<8sII")  # magic, sets, ways
BUCKETS = 8
SLOT = struct.Struct("<16sq8I")  # key digest, newest bucket index, counts ring
SLOT_SIZE = 64
WAYS = 4


class EventCounters:
    def __init__(self, path: Path, slots: int = 16384, create: bool = False) -> None:
        self.path = Path(path)
        self.sets = max(1, slots // WAYS)
        self.set_size = WAYS * SLOT_SIZE
        size = HEADER.size + 64 + self.sets * self.set_size
        self.mm, self.fd = map_shared(self.path, size, create, wipe=False, mismatch="counter table of another size")
        self.base = HEADER.size + 64
        if create and HEADER.unpack_from(self.mm, 0) != (MAGIC, self.sets, WAYS):
            self.mm[:size] = b"\0" * size
            HEADER.pack_into(self.mm, 0, MAGIC, self.sets, WAYS)

    def add(self, key: str, window: float, now: float | None = None, n: int = 1) -> int:
        """Count `n` events for `key` and return the sum over the sliding `window`."""
        now = time.time() if now is None else now
        width = max(window / BUCKETS, 1e-3)
        bucket = int(now / width)
        digest = hashlib.blake2b(f"{key}|{window}".encode(), digest_size=16).digest()
        s = int.from_bytes(digest[:8], "little") % self.sets
        start = self.base + s * self.set_size
        fcntl.lockf(self.fd, fcntl.LOCK_EX, self.set_size, start, os.SEEK_SET)
        try:
            slot, oldest, oldest_b = -1, -1, None
            for w in range(WAYS):
                off = start + w * SLOT_SIZE
                d, newest, *_ = SLOT.unpack_from(self.mm, off)
                if d == digest:
                    slot = off
                    break
                if oldest_b is None or newest < oldest_b:
                    oldest, oldest_b = off, newest
            if slot < 0:
                slot = oldest
                SLOT.pack_into(self.mm, slot, digest, bucket, *([0] * BUCKETS))
            _, newest, *counts = SLOT.unpack_from(self.mm, slot)
            if bucket > newest:
                for k in range(newest + 1, min(bucket, newest + BUCKETS) + 1):
                    counts[k % BUCKETS] = 0
                newest = bucket
            if bucket > newest - BUCKETS:  # an event older than the window is not counted
                counts[bucket % BUCKETS] = min(counts[bucket % BUCKETS] + n, 0xFFFFFFFF)
            SLOT.pack_into(self.mm, slot, digest, newest, *counts)
            return sum(counts)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, self.set_size, start, os.SEEK_SET)

    def reset(self, key: str, window: float) -> None:
        """Forget a key (after its ban fired, so the next ban needs a fresh run)."""
        digest = hashlib.blake2b(f"{key}|{window}".encode(), digest_size=16).digest()
        s = int.from_bytes(digest[:8], "little") % self.sets
        start = self.base + s * self.set_size
        fcntl.lockf(self.fd, fcntl.LOCK_EX, self.set_size, start, os.SEEK_SET)
        try:
            for w in range(WAYS):
                off = start + w * SLOT_SIZE
                if self.mm[off : off + 16] == digest:
                    self.mm[off : off + SLOT_SIZE] = b"\0" * SLOT_SIZE
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, self.set_size, start, os.SEEK_SET)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)
