"""Per-node heartbeat slots in anonymous shared memory, created before the first fork.

Each node writes only its own slot (pid, state, heartbeat, session counts), so
no lock is needed and a node killed mid-write can at worst leave its own slot
stale, which the supervisor resets when it reaps the node. The supervisor reads
every slot to find stale heartbeats and to answer `status`."""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass

SLOT = struct.Struct("<qqdddqqq")  # pid, state, started, heartbeat, updated_wall, sessions, sessions_total, rejected
SLOT_SIZE = 64
assert SLOT.size <= SLOT_SIZE

FREE, BOOTING, ACCEPTING, STOPPING = 0, 1, 2, 3
STATE_NAMES = {FREE: "free", BOOTING: "booting", ACCEPTING: "accepting", STOPPING: "stopping"}


@dataclass(frozen=True, slots=True)
class SlotView:
    slot: int
    pid: int
    state: int
    started: float  # monotonic
    heartbeat: float  # monotonic (CLOCK_MONOTONIC is system-wide on Linux)
    sessions: int
    sessions_total: int
    rejected: int


class NodeTable:
    def __init__(self, slots: int = 256) -> None:
        self.slots = slots
        self.mem = mmap.mmap(-1, slots * SLOT_SIZE, flags=mmap.MAP_SHARED)

    def _write(self, slot: int, *values: object) -> None:
        SLOT.pack_into(self.mem, slot * SLOT_SIZE, *values)

    def read(self, slot: int) -> SlotView:
        pid, state, started, beat, _wall, sessions, total, rejected = SLOT.unpack_from(self.mem, slot * SLOT_SIZE)
        return SlotView(slot, pid, state, started, beat, sessions, total, rejected)

    def claim(self, used: set[int]) -> int:
        for i in range(self.slots):
            if i not in used:
                return i
        raise RuntimeError(f"more than {self.slots} nodes")

    def reset(self, slot: int, pid: int = 0, state: int = FREE) -> None:
        now = time.monotonic()
        self._write(slot, pid, state, now, now, time.time(), 0, 0, 0)

    def beat(self, slot: int, pid: int, state: int, started: float, sessions: int, total: int, rejected: int) -> None:
        """Called by the node itself about once a second."""
        self._write(slot, pid, state, started, time.monotonic(), time.time(), sessions, total, rejected)


def passive_slices(low: int, high: int, count: int) -> list[tuple[int, int]]:
    """Split [low, high] into `count` disjoint, contiguous slices (the first get one more port
    when it does not divide). With more nodes than ports, nodes share single ports."""
    size = high - low + 1
    count = max(1, count)
    if size < count:
        return [(low + i % size, low + i % size) for i in range(count)]
    base, extra = divmod(size, count)
    out, start = [], low
    for i in range(count):
        n = base + (1 if i < extra else 0)
        out.append((start, start + n - 1))
        start += n
    return out
