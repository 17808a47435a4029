"""Per-node heartbeat slots in anonymous shared memory, created before the first fork.

Each node writes only its own slot (pid, state, heartbeat, session counts), so
no lock is needed and a node killed mid-write can at worst leave its own slot
stale, which the supervisor resets when it reaps the node. The supervisor reads
every slot to find stale heartbeats and to answer `status`.

A slot is a seqlock: a sequence word, odd while its writer is in the middle of
a write, then the record. `struct.pack_into` zero-fills before it writes, so
without it a reader racing a heartbeat saw `pid = 0` (about 1 % of reads) and
the supervisor killed a healthy node as stale. The sequence word is one aligned
8-byte store (a memoryview of 'Q'). On x86-64 stores and loads are not reordered
with each other, so a reader that sees the same even value before and after
reading the record has a record from one write. Python has no memory barriers,
and ARM (aarch64) may reorder them, so the record also carries a CRC32 of its
body: a record mixed from two writes fails it and is read again, whatever order
the stores became visible in."""

from __future__ import annotations

import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass

SEQ = struct.Struct("<Q")  # the slot's sequence word, at its start
CRC = struct.Struct("<Q")  # CRC32 of the body (in a word of its own), after the sequence word
BODY = struct.Struct("<qqddqqqq")  # pid, state, started, heartbeat, sessions, sessions_total, rejected, in_use
RECORD_OFF = SEQ.size  # the CRC word, then the body
SLOT_SIZE = 128  # two cache lines: a slot never shares a line with its neighbour's sequence word
assert SEQ.size + CRC.size + BODY.size <= SLOT_SIZE and SLOT_SIZE % 8 == 0
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
    in_use: int = 0  # sessions and connections still being set up (TLS handshake, PROXY header): the cap counts both


class NodeTable:
    def __init__(self, slots: int = 256) -> None:
        self.slots = slots
        self.mem = mmap.mmap(-1, slots * SLOT_SIZE, flags=mmap.MAP_SHARED)
        self.words = memoryview(self.mem).cast("Q")  # one aligned 8-byte load or store per item
        self._last: dict[int, SlotView] = {}  # this process's last consistent read of each slot

    def _write(self, slot: int, *values: object) -> None:
        """One writer per slot at a time (the node while it runs, the supervisor
        before the fork and after the reap)."""
        i, off = slot * SLOT_SIZE // 8, slot * SLOT_SIZE + RECORD_OFF
        body = BODY.pack(*values)
        record = CRC.pack(zlib.crc32(body)) + body
        seq = self.words[i]
        seq += seq & 1  # a writer that died mid-write left it odd: start from the next even value
        self.words[i] = seq + 1
        self.mem[off : off + len(record)] = record
        self.words[i] = seq + 2

    def read(self, slot: int) -> SlotView:
        """A record from one write: retried while a writer is in the middle of one
        (odd or moving sequence word, or a body that fails its CRC)."""
        i, off = slot * SLOT_SIZE // 8, slot * SLOT_SIZE + RECORD_OFF
        end = off + CRC.size + BODY.size
        deadline = 0.0
        spins = 0
        while True:
            seq = self.words[i]
            if seq == 0:  # never written: a free slot
                return SlotView(slot, 0, FREE, 0.0, 0.0, 0, 0, 0)
            if not seq & 1:
                record = self.mem[off:end]
                if self.words[i] == seq and CRC.unpack_from(record)[0] == zlib.crc32(record[CRC.size :]):
                    view = SlotView(slot, *BODY.unpack_from(record, CRC.size))
                    self._last[slot] = view
                    return view
            spins += 1
            if spins >= READ_SPINS:
                now = time.monotonic()
                if not deadline:
                    deadline = now + READ_PATIENCE
                elif now > deadline:  # its writer died mid-write (and is about to be reaped)
                    return self._last.get(slot) or SlotView(slot, *BODY.unpack_from(self.mem, off + CRC.size))
                os.sched_yield()

    def claim(self, used: set[int]) -> int:
        for i in range(self.slots):
            if i not in used:
                return i
        raise RuntimeError(f"more than {self.slots} nodes")

    def reset(self, slot: int, pid: int = 0, state: int = FREE) -> None:
        now = time.monotonic()
        self._write(slot, pid, state, now, now, 0, 0, 0, 0)

    def beat(self, slot: int, pid: int, state: int, started: float, sessions: int, total: int, rejected: int,
             in_use: int = 0) -> None:  # fmt: skip
        """Called by the node itself about once a second (and when it fills up or has room again)."""
        self._write(slot, pid, state, started, time.monotonic(), sessions, total, rejected, in_use)


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
