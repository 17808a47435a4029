"""Heartbeat slots under a writer that never stops: a reader in another process
must never see a record mixed from two writes (or the zero-fill that
`struct.pack_into` does first: that `pid = 0` made the supervisor SIGKILL a
healthy node as stale). The same loop against a writer without the sequence
word shows the check catches the old behaviour. A writer whose body stores land
after its closing sequence store (what aarch64 may do: Python has no barriers)
is caught by the record's CRC."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import zlib

from ftpcluster.supervisor.node_table import BODY, CRC, RECORD_OFF, SLOT_SIZE, NodeTable, SlotView

SLOT = 3


def _reordered_write(table: NodeTable, k: int) -> None:
    """The sequence word closed before the second half of the body is stored: the
    order a weakly ordered CPU may make the plain stores visible in."""
    i, off = SLOT * SLOT_SIZE // 8, SLOT * SLOT_SIZE + RECORD_OFF
    body = BODY.pack(k, 2, float(k), float(k), k, k, k, k)
    record = CRC.pack(zlib.crc32(body)) + body
    half = len(record) // 2
    seq = table.words[i]
    table.words[i] = seq + 1
    table.mem[off : off + half] = record[:half]
    table.words[i] = seq + 2
    table.mem[off + half : off + len(record)] = record[half:]


def _hammer(table: NodeTable, stop_at: float, mode: str) -> None:
    """Rewrite the slot as fast as possible; every record has pid == sessions ==
    sessions_total == rejected == int(started) == int(heartbeat) != 0."""
    k = 1
    off = SLOT * SLOT_SIZE + RECORD_OFF + CRC.size
    while time.monotonic() < stop_at:
        for _ in range(1000):
            k += 1
            if mode == "raw":  # the old way: one pack_into, no sequence word
                BODY.pack_into(table.mem, off, k, 2, float(k), float(k), k, k, k, k)
            elif mode == "reordered":
                _reordered_write(table, k)
            else:
                table._write(SLOT, k, 2, float(k), float(k), k, k, k, k)


def _seq_only_read(table: NodeTable) -> Any:
    """The reader before the CRC: the sequence word checked, nothing else."""
    i, off = SLOT * SLOT_SIZE // 8, SLOT * SLOT_SIZE + RECORD_OFF + CRC.size
    while True:
        seq = table.words[i]
        if not seq & 1:
            values = BODY.unpack_from(table.mem, off)
            if table.words[i] == seq:
                return SlotView(SLOT, *values)


def _torn_reads(mode: str, seconds: float, stop_on_first: bool, check_crc: bool = True) -> tuple[int, int, Any]:
    table = NodeTable(slots=8)
    table._write(SLOT, 1, 2, 1.0, 1.0, 1, 1, 1, 1)
    ctx = multiprocessing.get_context("fork")
    stop_at = time.monotonic() + seconds + 0.5
    writer = ctx.Process(target=_hammer, args=(table, stop_at, mode), daemon=True)
    writer.start()
    reads = torn = 0
    first = None
    try:
        time.sleep(0.2)  # the writer is running
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(2000):
                v = table.read(SLOT) if check_crc else _seq_only_read(table)
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
    reads, torn, first = _torn_reads("seqlock", seconds=1.5, stop_on_first=False)
    assert reads > 10_000, reads
    assert torn == 0, f"{torn} torn records in {reads} reads, first {first}"


def test_torn_read_loop_catches_a_writer_without_the_sequence_word() -> None:
    reads, torn, first = _torn_reads("raw", seconds=5.0, stop_on_first=True, check_crc=False)
    assert torn > 0, f"no torn record in {reads} reads against a plain pack_into writer: the check proves nothing"


def test_crc_catches_stores_seen_out_of_order() -> None:
    """The sequence word alone passes a body half-stored after it closed; the CRC
    does not. Both halves of this test run against the same writer."""
    reads, torn, first = _torn_reads("reordered", seconds=1.5, stop_on_first=False)
    assert reads > 10_000, reads
    assert torn == 0, f"{torn} torn records in {reads} reads, first {first}"
    reads, torn, first = _torn_reads("reordered", seconds=5.0, stop_on_first=True, check_crc=False)
    assert torn > 0, f"no torn record in {reads} reads without the CRC: the writer proves nothing"


def test_a_never_written_slot_reads_as_free_at_once() -> None:
    table = NodeTable(slots=4)
    started = time.monotonic()
    view = table.read(2)
    assert (view.pid, view.state) == (0, 0)
    table.reset(2, pid=7, state=1)
    assert (table.read(2).pid, table.read(2).state) == (7, 1)
    assert time.monotonic() - started < 1.0  # no READ_PATIENCE wait on the fresh slot
