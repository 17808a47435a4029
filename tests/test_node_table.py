"""Heartbeat slots under a writer that never stops: a reader in another process
must never see a record mixed from two writes (or the zero-fill that
`struct.pack_into` does first: that `pid = 0` made the supervisor SIGKILL a
healthy node as stale). The same loop against a writer without the sequence
word shows the check catches the old behaviour."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from ftpcluster.supervisor.node_table import BODY, SEQ, SLOT_SIZE, NodeTable

SLOT = 3


def _hammer(table: NodeTable, stop_at: float, raw: bool) -> None:
    """Rewrite the slot as fast as possible; every record has pid == sessions ==
    sessions_total == rejected == int(started) == int(heartbeat) != 0."""
    k = 1
    off = SLOT * SLOT_SIZE + SEQ.size
    while time.monotonic() < stop_at:
        for _ in range(1000):
            k += 1
            if raw:  # the old way: one pack_into, no sequence word
                BODY.pack_into(table.mem, off, k, 2, float(k), float(k), k, k, k)
            else:
                table._write(SLOT, k, 2, float(k), float(k), k, k, k)


def _torn_reads(raw: bool, seconds: float, stop_on_first: bool) -> tuple[int, int, Any]:
    table = NodeTable(slots=8)
    table._write(SLOT, 1, 2, 1.0, 1.0, 1, 1, 1)
    ctx = multiprocessing.get_context("fork")
    stop_at = time.monotonic() + seconds + 0.5
    writer = ctx.Process(target=_hammer, args=(table, stop_at, raw), daemon=True)
    writer.start()
    reads = torn = 0
    first = None
    try:
        time.sleep(0.2)  # the writer is running
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(2000):
                v = table.read(SLOT)
                reads += 1
                k = v.pid
                if k == 0 or not (v.sessions == v.sessions_total == v.rejected == int(v.started) == int(v.heartbeat) == k):
                    torn += 1
                    first = first or v
            if torn and stop_on_first:
                break
    finally:
        writer.kill()
        writer.join(5)
    return reads, torn, first


def test_heartbeat_reader_never_sees_a_torn_record() -> None:
    reads, torn, first = _torn_reads(raw=False, seconds=1.5, stop_on_first=False)
    assert reads > 10_000, reads
    assert torn == 0, f"{torn} torn records in {reads} reads, first {first}"


def test_torn_read_loop_catches_a_writer_without_the_sequence_word() -> None:
    reads, torn, first = _torn_reads(raw=True, seconds=5.0, stop_on_first=True)
    assert torn > 0, f"no torn record in {reads} reads against a plain pack_into writer: the check proves nothing"
