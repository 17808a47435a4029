"""Ban table readers catch up from the change log: a reader in another process
follows adds, removes, records reused for other names, networks and expiry
without re-parsing the table (one full parse at start, another only when it
falls further behind than the log)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

from ftpcluster.cluster.ban_table import LOG_SIZE, Ban, BanTable, BanView

READER = """
import json, sys
from ftpcluster.cluster.ban_table import BanTable, BanView
view = BanView(BanTable(sys.argv[1], 4096), {"lab": ["192.0.2.0/28"]})
probes = json.loads(sys.argv[2])
print("go", flush=True)
for line in sys.stdin:
    view.refresh()
    print(json.dumps({
        "full_reads": view.full_reads,
        "hosts": sorted(view.hosts), "users": sorted(view.users),
        "banned": [p for p in probes if view.host_ban(p) is not None],
        "user_banned": [u for u in ("mallory", "eve") if view.user_ban(u, "10.9.9.9") is not None],
    }), flush=True)
"""

PROBES = ["10.0.0.1", "10.0.0.2", "10.0.0.50", "10.0.1.7", "192.0.2.5", "192.0.2.99", "198.51.100.9", "10.0.0.199"]


class Reader:
    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", READER, path, json.dumps(PROBES)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "go"

    def look(self) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("look\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def _truth(t: BanTable) -> tuple[list[str], list[str]]:
    _, bans = t.snapshot()
    return sorted(b.name for b in bans if b.kind == "host" and "/" not in b.name), sorted(
        b.name for b in bans if b.kind in ("user", "userhost"))  # fmt: skip


def test_reader_in_another_process_follows_the_change_log(tmp_path) -> None:
    path = str(tmp_path / "bans.shm")
    t = BanTable(path, 4096, create=True)
    t.add(Ban("host", "10.0.0.1", None, "before the reader"))
    r = Reader(path)
    try:
        first = r.look()
        assert first["full_reads"] == 1 and first["banned"] == ["10.0.0.1"]

        for i in range(200):  # adds
            t.add(Ban("host", f"10.0.0.{i}", None, "burst"))
        t.add(Ban("user", "mallory", None, "u"))
        got = r.look()
        assert (got["hosts"], got["users"]) == _truth(t)
        assert got["banned"] == ["10.0.0.1", "10.0.0.2", "10.0.0.50", "10.0.0.199"]
        assert got["user_banned"] == ["mallory"]

        # removes, a freed record reused for another name, the old name back elsewhere
        assert t.remove("host", "10.0.0.2") and t.remove("host", "10.0.0.50") and t.remove("user", "mallory")
        t.add(Ban("host", "10.0.1.7", None, "reuses a freed record"))
        t.add(Ban("host", "10.0.0.2", None, "back"))
        t.add(Ban("host", "192.0.2.0/29", None, "net"))
        t.add(Ban("class", "lab", None, "class"))
        got = r.look()
        assert (got["hosts"], got["users"]) == _truth(t)
        assert got["banned"] == ["10.0.0.1", "10.0.0.2", "10.0.1.7", "192.0.2.5", "10.0.0.199"]
        assert got["user_banned"] == []
        assert t.remove("host", "192.0.2.0/29")
        assert r.look()["banned"] == ["10.0.0.1", "10.0.0.2", "10.0.1.7", "192.0.2.5", "10.0.0.199"]  # the class still
        assert t.remove("class", "lab")
        assert "192.0.2.5" not in r.look()["banned"]

        # expiry: seen at lookup without any write, then the purge takes the record out
        t.add(Ban("host", "198.51.100.9", time.time() + 0.3, "short"))
        t.add(Ban("user", "eve", time.time() + 0.3, "short"))
        got = r.look()
        assert "198.51.100.9" in got["banned"] and got["user_banned"] == ["eve"]
        time.sleep(0.4)
        got = r.look()
        assert "198.51.100.9" not in got["banned"] and got["user_banned"] == []
        assert t.purge() == 2
        got = r.look()
        assert "198.51.100.9" not in got["hosts"] and "eve" not in got["users"]
        assert got["full_reads"] == 1, "a reader within the log's reach parsed the whole table again"

        # A reader further behind than the log parses the whole table once, and is right.
        for i in range(LOG_SIZE // 2 + 10):
            t.add(Ban("host", f"10.1.{i // 256}.{i % 256}", None, "flood"))
            t.remove("host", f"10.1.{i // 256}.{i % 256}")
        t.add(Ban("host", "10.0.0.50", None, "after the flood"))
        got = r.look()
        assert got["full_reads"] == 2
        assert (got["hosts"], got["users"]) == _truth(t)
        assert "10.0.0.50" in got["banned"]
    finally:
        r.close()


WRITER = """
import sys, time
from ftpcluster.cluster.ban_table import Ban, BanTable
t = BanTable(sys.argv[1], 256)
print("go", flush=True)
i = int(sys.argv[2])
while True:
    i += 7
    name = f"10.{i % 5}.{i % 241}.{i % 11}"
    t.add(Ban("host", name, time.time() + 3600, "x" * (i % 90)))  # a full table replaces these
    if i % 3 == 0:
        t.remove("host", name)
"""


def test_incremental_reader_agrees_with_a_full_parse_after_writers_are_killed(tmp_path) -> None:
    """Writers SIGKILLed at random instants (some between a record and its log
    entry): a reader that only ever caught up from the log ends up with exactly
    what a fresh full parse sees, once the next write has gone through."""
    path = str(tmp_path / "bans.shm")
    t = BanTable(path, 256, create=True)
    view = BanView(t, {})
    rng = random.Random(17)
    for round_ in range(5):
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(round_ * 1000 + k)], stdout=subprocess.PIPE)
                 for k in range(2)]  # fmt: skip
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == b"go"
        end = time.monotonic() + rng.uniform(0.005, 0.05)
        while time.monotonic() < end:
            view.refresh()
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        view.refresh()
    assert t.add(Ban("host", "192.0.2.1", None, "after"))  # repairs what a killed writer left unlogged
    view.refresh()
    fresh = BanView(BanTable(path, 256), {})
    fresh.refresh()
    assert sorted(view.hosts) == sorted(fresh.hosts) and "192.0.2.1" in view.hosts
    assert view.full_reads == 1 and len(view.hosts) > 10

    # The exact instant: a writer that dies after its record, before its log entry.
    died = ("import os, sys; from ftpcluster.cluster.ban_table import Ban, BanTable; t = BanTable(sys.argv[1], 256); "
            "t._publish = lambda i: os._exit(9); t.add(Ban('host', '203.0.113.9', None, 'died'))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", died, path], timeout=30).returncode == 9
    view.refresh()
    assert "203.0.113.9" not in view.hosts  # not logged: the reader cannot know yet
    assert t.add(Ban("host", "192.0.2.3", None, "next writer"))
    view.refresh()
    assert "203.0.113.9" in view.hosts and "192.0.2.3" in view.hosts
