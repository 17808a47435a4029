"""The shared-memory ban table and event counters: processes killed with SIGKILL in
the middle of writes never wedge them; a torn record is skipped, never read as a ban;
sliding windows; a full table."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

from ftpcluster.cluster.ban_counters import EventCounters
from ftpcluster.cluster.ban_table import REC_SIZE, Ban, BanTable, BanView

WRITER = """
import sys, time, random
from ftpcluster.cluster.ban_table import Ban, BanTable
from ftpcluster.cluster.ban_counters import EventCounters
t = BanTable(sys.argv[1], 256)
c = EventCounters(sys.argv[2], 64)
print("go", flush=True)
i = 0
while True:
    i += 1
    name = f"10.{i % 7}.{i % 251}.{i % 13}"
    t.add(Ban("host", name, time.time() + 60, "x" * (i % 90), manual=bool(i % 2)))
    if i % 3 == 0:
        t.remove("host", name)
    c.add(f"k{i % 50}", 60.0)
"""


def test_sigkill_mid_write_never_wedges_the_lock(tmp_path):
    tpath, cpath = tmp_path / "bans.shm", tmp_path / "cnt.shm"
    BanTable(tpath, 256, create=True)
    EventCounters(cpath, 64, create=True)
    rng = random.Random(7)
    for _ in range(25):
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER, str(tpath), str(cpath)], stdout=subprocess.PIPE)
            for _ in range(2)
        ]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == b"go"
        time.sleep(rng.uniform(0.001, 0.05))
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
    # A new writer gets the lock at once (the kernel freed the dead holders' locks)...
    code = (
        "import sys, time; from ftpcluster.cluster.ban_table import Ban, BanTable; "
        "from ftpcluster.cluster.ban_counters import EventCounters; "
        "t = BanTable(sys.argv[1], 256); assert t.add(Ban('host', '192.0.2.1', None, 'after')); "
        "EventCounters(sys.argv[2], 64).add('k1', 60.0); print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tpath), str(cpath)], capture_output=True, text=True, timeout=20)
    assert r.stdout.strip() == "ok", r.stderr
    # ...and the table still reads (torn records: test_torn_record_is_skipped_not_read).
    table = BanTable(tpath, 256)
    _, bans = table.snapshot()
    assert any(b.name == "192.0.2.1" for b in bans)
    table.purge()
    view = BanView(table, {})
    assert view.host_ban("192.0.2.1") is not None
    assert view.host_ban("192.0.2.2") is None


def test_torn_record_is_skipped_not_read(tmp_path):
    """A writer killed between two stores of a record leaves a mix of old and new bytes.
    A one-store mmap write never tears under SIGKILL, so tear records by hand: any
    change to a record's bytes after its CRC was written makes it not a record."""
    t = BanTable(tmp_path / "b.shm", 8, create=True)
    t.add(Ban("host", "10.0.0.1", None, "whole", manual=True))
    t.add(Ban("host", "10.0.0.2", None, "to be torn", manual=True))
    slot = next(i for i in range(8) if (b := t._read(i)) is not None and b.name == "10.0.0.2")
    off = t.base + slot * REC_SIZE
    view = BanView(t, {})
    assert view.host_ban("10.0.0.2") is not None
    for where in (off + 12, off + 40, off + 40 + 80):  # expiry, name, reason: each torn alone
        saved = bytes(t.mm[off : off + REC_SIZE])
        t.mm[where] ^= 0x01
        t._bump()  # readers re-read, as after any write
        _, bans = t.snapshot()
        assert [b.name for b in bans] == ["10.0.0.1"], (where - off, bans)
        assert view.host_ban("10.0.0.2") is None and view.host_ban("10.0.0.1") is not None
        t.mm[off : off + REC_SIZE] = saved
        t._bump()
        assert view.host_ban("10.0.0.2") is not None
    # A torn record's slot is free space: purge clears it and the next add reuses it.
    t.mm[off + 40] ^= 0x01
    assert t.purge() == 1 and t.mm[off + 4] == 0
    assert t.add(Ban("host", "10.0.0.3", None, "reuses the slot", manual=True))
    assert t._read(slot) is not None and t._read(slot).name == "10.0.0.3"


def test_full_table_replaces_automatic_bans_and_refuses_when_all_manual(tmp_path):
    t = BanTable(tmp_path / "b.shm", 4, create=True)
    now = time.time()
    for i in range(4):
        assert t.add(Ban("host", f"10.0.0.{i}", now + 100 + i, "auto"))
    assert t.add(Ban("host", "10.0.1.1", now + 500, "newer"))  # replaces the one ending soonest
    names = {b.name for b in t.snapshot()[1]}
    assert "10.0.0.0" not in names and "10.0.1.1" in names
    t2 = BanTable(tmp_path / "m.shm", 2, create=True)
    assert t2.add(Ban("host", "10.0.0.1", None, "manual", manual=True))
    assert t2.add(Ban("user", "bob", None, "manual", manual=True))
    assert not t2.add(Ban("host", "10.0.0.2", now + 60, "auto"))
    assert t2.add(Ban("host", "10.0.0.1", now + 60, "same key replaces", manual=True))


def test_expired_records_are_reused_and_purged(tmp_path):
    t = BanTable(tmp_path / "b.shm", 2, create=True)
    now = time.time()
    assert t.add(Ban("host", "10.0.0.1", now - 1, "old"))
    assert t.add(Ban("host", "10.0.0.2", now - 1, "old"))
    assert t.add(Ban("host", "10.0.0.3", None, "new", manual=True))  # reuses an expired record
    assert t.add(Ban("host", "10.0.0.4", now + 60, "timed"))
    assert {b.name for b in t.snapshot()[1]} == {"10.0.0.3", "10.0.0.4"}
    assert t.purge(now=now + 120) == 1
    assert [b.name for b in t.snapshot()[1]] == ["10.0.0.3"]


def test_view_follows_generation_and_networks(tmp_path):
    t = BanTable(tmp_path / "b.shm", 64, create=True)
    view = BanView(t, {"office": ["192.168.7.0/24", "2001:db8::/32"]})
    assert view.host_ban("192.168.7.9") is None
    t.add(Ban("class", "office", None))
    assert view.host_ban("192.168.7.9") is not None
    assert view.host_ban("2001:db8::1") is not None
    assert view.host_ban("192.168.8.1") is None
    t.add(Ban("host", "10.9.0.0/16", None))
    assert view.host_ban("10.9.200.1") is not None
    t.add(Ban("userhost", "bob@10.1.1.1", None))
    assert view.user_ban("bob", "10.1.1.1") is not None
    assert view.user_ban("bob", "10.1.1.2") is None
    t.remove("class", "office")
    assert view.host_ban("192.168.7.9") is None


def test_sliding_window_has_no_edge_to_time_bursts_at(tmp_path):
    c = EventCounters(tmp_path / "c.shm", 64, create=True)
    t0 = 1_000_000.0  # window 80 s = 8 buckets of 10 s
    assert c.add("k", 80, now=t0) == 1
    assert c.add("k", 80, now=t0 + 75) == 2  # still inside the window
    # A fixed window started at t0 would have reset at t0+80; the slide keeps counting.
    assert c.add("k", 80, now=t0 + 81) == 2  # the t0 event slid out, t0+75 and t0+81 remain
    assert c.add("k", 80, now=t0 + 500) == 1  # long after: only the new event
    assert c.add("other", 80, now=t0 + 500) == 1
    c.reset("k", 80)
    assert c.add("k", 80, now=t0 + 501) == 1
