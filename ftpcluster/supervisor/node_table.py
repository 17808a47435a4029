"""Per-node heartbeat slots in anonymous shared memory, created before the first fork.

Each node writes only its own slot (pid, state, heartbeat, session counts), so
no lock is needed and a node killed mid-write can at worst leave its own slot
stale, which the supervisor resets when it reaps the node. The supervisor reads
every slot to find stale heartbeats and to answer `status`.

A slot is a seqlock: a sequence word, odd while its writer is in the middle of
a write, then the record. `struct.pack_into` zero-fills before it writes, so
without it a reader racing a heartbeat saw `pid = 0` (about 1 % of reads) and
the supervisor killed a healthy node as stale. The sequence word is one aligned
8-byte store (a memoryview of 'Q'), and on x86-64 stores and loads are not
reordered with each other, so a reader that sees the same even value before and
after reading the record has a record from one write."""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

SEQ = struct.Struct("<Q")  # the slot's sequence word, at its start
BODY = struct.Struct("<qqddqqq")  # pid, state, started, heartbeat, sessions, sessions_total, rejected
SLOT_SIZE = 64
assert SEQ.size + BODY.size <= SLOT_SIZE and SLOT_SIZE % 8 == 0
READ_SPINS = 64  # plain re-reads before yielding the CPU to a writer that was preempted mid-write
READ_PATIENCE = 0.05  # seconds; after that the last consistent view of the slot is returned

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
        self.words = memoryview(self.mem).cast("Q")  # one aligned 8-byte load or store per item
        self._last: dict[int, SlotView] = {}  # this process's last consistent read of each slot

    def _write(self, slot: int, *values: object) -> None:
        """One writer per slot at a time (the node while it runs, the supervisor
        before the fork and after the reap)."""
        i = slot * SLOT_SIZE // 8
        seq = self.words[i]
        seq += seq & 1  # a writer that died mid-write left it odd: start from the next even value
        self.words[i] = seq + 1
        BODY.pack_into(self.mem, slot * SLOT_SIZE + SEQ.size, *values)
        self.words[i] = seq + 2

    def read(self, slot: int) -> SlotView:
        """A record from one write: retried while a writer is in the middle of one."""
        i, off = slot * SLOT_SIZE // 8, slot * SLOT_SIZE + SEQ.size
        deadline = 0.0
        spins = 0
        while True:
            seq = self.words[i]
            if not seq & 1:
                values = BODY.unpack_from(self.mem, off)
                if self.words[i] == seq:
                    view = SlotView(slot, *values)
                    self._last[slot] = view
                    return view
            spins += 1
            if spins >= READ_SPINS:
                now = time.monotonic()
                if not deadline:
                    deadline = now + READ_PATIENCE
                elif now > deadline:  # its writer died mid-write (and is about to be reaped)
                    return self._last.get(slot) or SlotView(slot, *BODY.unpack_from(self.mem, off))
                os.sched_yield()

    def claim(self, used: set[int]) -> int:
        for i in range(self.slots):
            if i not in used:
                return i
        raise RuntimeError(f"more than {self.slots} nodes")

    def reset(self, slot: int, pid: int = 0, state: int = FREE) -> None:
        now = time.monotonic()
        self._write(slot, pid, state, now, now, 0, 0, 0)

    def beat(self, slot: int, pid: int, state: int, started: float, sessions: int, total: int, rejected: int) -> None:
        """Called by the node itself about once a second."""
        self._write(slot, pid, state, started, time.monotonic(), sessions, total, rejected)


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
