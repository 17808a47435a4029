"""memcached is not trusted: what an attacker on its network writes is ignored.

Two hosts (h1, h2) share one real memcached and one cluster key; the test plays
the attacker with raw memcached commands: forged change-log entries, a valid
entry copied to a later sequence number, a forged removal (log entry, removal
record, deleted keys), forged records and index entries, a changed expiry and
records MACed under another cluster's key. All are ignored and counted
(`ftpcluster_memcache_rejected_total`), while real bans and permits keep
propagating; a key rotation keeps bans and TLS sessions working. The servers
are shared by the cases (module scope); they run in file order, the rotation
last."""

from __future__ import annotations

import json
import re
import shutil
import socket
import urllib.request

import pytest

from ftpcluster.cluster.ban_sync import _shard
from ftpcluster.cluster.record_mac import RecordMac
from ftpcluster.cluster.session_seal import Secret, load_secrets

from .support_memcached import Memcached, have_memcached, start_memcached
from .support_server import Server, cli, free_port, have, make_server, wait_for
from .test_bans import bans_json, greet
from .test_ftps import s_client

pytestmark = pytest.mark.slow  # multi-host, memcached written by others: `make test` runs it, -m "not slow" leaves it out

NS = "ftpcluster:v1:"


class Cluster:
    def __init__(self, tmp, mc: Memcached) -> None:
        self.tmp, self.mc = tmp, mc
        self.section = {"enabled": True, "servers": [mc.address], "timeout": "200ms", "connect_failures": 2,
                        "probe_interval": "300ms"}  # fmt: skip
        self.hosts: list[Server] = []
        self.metrics: dict[str, int] = {}

    def host(self, name: str) -> Server:
        port = free_port()
        h = make_server(self.tmp / name, tls={"session_cache": "memcache", "session_tickets": "off"},
                        memcache=self.section, metrics={"listen": f"127.0.0.1:{port}"})  # fmt: skip
        if self.hosts:  # one certificate for the cluster
            for f in ("cert.pem", "key.pem"):
                shutil.copy(self.hosts[0].dir / "certs" / f, h.dir / "certs" / f)
        self.metrics[h.config.as_posix()] = port
        self.hosts.append(h)
        return h.start()

    def rejected(self, h: Server, kind: str) -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics[h.config.as_posix()]}/metrics", timeout=10).read()
        m = re.search(rf'ftpcluster_memcache_rejected_total{{kind="{kind}"}} (\d+)', text.decode())
        return int(m.group(1)) if m else -1

    # ------------------------------------------------------------ the attacker's tools
    def _cmd(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.mc.port), timeout=5) as s:
            s.sendall(data)
            out = b""
            while not out.endswith((b"END\r\n", b"STORED\r\n", b"DELETED\r\n", b"NOT_FOUND\r\n")) and not re.fullmatch(rb"\d+\r\n", out):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
            return out

    def set(self, name: str, value: bytes) -> None:
        assert self._cmd(f"set {NS}{name} 0 0 {len(value)}\r\n".encode() + value + b"\r\n") == b"STORED\r\n"

    def get(self, name: str) -> bytes | None:
        out = self._cmd(f"get {NS}{name}\r\n".encode())
        return out.split(b"\r\n")[1] if out.startswith(b"VALUE") else None

    def delete(self, name: str) -> None:
        self._cmd(f"delete {NS}{name}\r\n".encode())

    def append_log(self, value: bytes) -> int:
        """Write the next change-log entry the way a writer does (incr banseq, set banlog:<seq>)."""
        seq = int(self._cmd(f"incr {NS}banseq 1\r\n".encode()).strip())
        self.set(f"banlog:{seq}", value)
        return seq


def payload(record: bytes) -> dict:
    return json.loads(record.split(b".", 3)[3])


def with_payload(record: bytes, d: dict) -> bytes:
    """The record's header and MAC in front of another payload (what an attacker can make)."""
    return b".".join(record.split(b".", 3)[:3]) + b"." + json.dumps(d, separators=(",", ":")).encode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not have_memcached():
        pytest.skip("memcached is not installed")
    mc = start_memcached(1)[0]
    c = Cluster(tmp_path_factory.mktemp("trust"), mc)
    try:
        c.host("h1")
        c.host("h2")
        yield c
    finally:
        for h in c.hosts:
            h.stop()
        mc.stop()


def refused(h: Server, ip: str) -> bool:
    return greet(h, ip).startswith(b"530")


def ban(h: Server, ip: str, *extra: str) -> None:
    r = cli("ban", "host", ip, *extra, config=h.config)
    assert r.returncode == 0, r.stderr


def propagate(c: Cluster, ip: str) -> None:
    """A real ban made on h1 reaches h2 (after a forged log entry: through the full reload
    that follows the gap wait)."""
    ban(c.hosts[0], ip, "--for", "1h")
    assert wait_for(lambda: refused(c.hosts[1], ip), timeout=10), f"real ban {ip} did not reach h2"


def test_forged_and_replayed_log_entries_are_ignored(cluster):
    c = cluster
    h1, h2 = c.hosts[:2]
    propagate(c, "127.0.3.1")
    real_add = c.get(f"banlog:{int(c.get('banseq'))}")
    assert real_add is not None and payload(real_add)["ban"]["name"] == "127.0.3.1"
    base = c.rejected(h2, "banlog")

    # 1. A copy of a real entry with another address and origin host: the MAC no longer fits.
    forged = payload(real_add)
    forged["ban"].update(name="127.0.3.2", origin_host="attacker")
    c.append_log(with_payload(real_add, forged))
    propagate(c, "127.0.3.5")
    assert c.rejected(h2, "banlog") == base + 1

    # 2. The real entry, valid for its own sequence number, copied to a new one after
    #    the ban was lifted: it would bring the ban back.
    assert cli("permit", "host", "127.0.3.1", config=h1.config).returncode == 0
    assert wait_for(lambda: not refused(h2, "127.0.3.1"), timeout=10)
    c.append_log(real_add)
    propagate(c, "127.0.3.6")
    assert c.rejected(h2, "banlog") == base + 2

    # 3. A well-formed entry without any MAC (what worked before records were MACed).
    plain = {"op": "add", "ban": {**payload(real_add)["ban"], "name": "127.0.3.3", "origin_host": "attacker"}}
    c.append_log(json.dumps(plain).encode())
    propagate(c, "127.0.3.7")
    assert c.rejected(h2, "banlog") == base + 3
    for ip in ("127.0.3.1", "127.0.3.2", "127.0.3.3"):
        assert not refused(h2, ip) and not refused(h1, ip), ip


def test_forged_removal_of_a_real_ban_is_ignored(cluster):
    c = cluster
    h1, h2 = c.hosts[:2]
    propagate(c, "127.0.3.10")
    removal_of_other = c.get("ban:host:127.0.3.1")  # the real removal record of the permit above
    assert removal_of_other is not None and payload(removal_of_other)["removed"] is True
    log_entry = c.get(f"banlog:{int(c.get('banseq'))}")
    base_ban, base_log = c.rejected(h2, "ban"), c.rejected(h2, "banlog")
    # The ban's record and its index shard deleted, a valid removal record copied onto
    # its key, and a removal log entry under a MAC made for another entry.
    c.delete("ban:host:127.0.3.10")
    c.delete(f"banidx:{_shard('host', '127.0.3.10')}")
    c.set("ban:host:127.0.3.10", removal_of_other)
    c.append_log(with_payload(log_entry, {"op": "remove", "kind": "host", "name": "127.0.3.10", "upto": 9e9,
                                          "origin_host": "attacker"}))  # fmt: skip
    propagate(c, "127.0.3.11")  # after the full reload that reads the removal record
    assert c.rejected(h2, "banlog") == base_log + 1
    assert wait_for(lambda: c.rejected(h2, "ban") > base_ban, timeout=10)
    assert refused(h1, "127.0.3.10") and refused(h2, "127.0.3.10")
    # A real permit still lifts it everywhere.
    assert cli("permit", "host", "127.0.3.10", config=h2.config).returncode == 0
    assert wait_for(lambda: not refused(h1, "127.0.3.10"), timeout=10)


def _free_shard_ip(taken: set[int], start: int) -> str:
    for i in range(start, start + 200):
        ip = f"127.0.4.{i}"
        if _shard("host", ip) not in taken:
            taken.add(_shard("host", ip))
            return ip
    raise AssertionError("no free shard")


def test_forged_records_and_index_ignored_by_a_host_started_later(cluster):
    c = cluster
    h1, h2 = c.hosts[:2]
    propagate(c, "127.0.3.20")
    for ip in ("127.0.3.21", "127.0.3.22"):
        ban(h1, ip, "--for", "1h")
        assert wait_for(lambda ip=ip: refused(h2, ip), timeout=10)
    taken = {_shard("host", f"127.0.3.{i}") for i in (5, 6, 7, 11, 20, 21, 22)}
    real = c.get("ban:host:127.0.3.20")
    assert real is not None
    # A forged ban record with a forged index entry (a real record's MAC in front).
    x = _free_shard_ip(taken, 1)
    c.set(f"ban:host:{x}", with_payload(real, {**payload(real), "name": x, "origin_host": "attacker"}))
    c.set(f"banidx:{_shard('host', x)}", with_payload(real, [f"host:{x}"]))  # type: ignore[arg-type]
    # Record, index entry and log entry MACed under another cluster's key.
    other = RecordMac([Secret(1, b"o" * 32)], NS)
    y = _free_shard_ip(taken, 100)
    c.set(f"ban:host:{y}", other.seal(f"ban:host:{y}", json.dumps({**payload(real), "name": y}).encode()))
    c.set(f"banidx:{_shard('host', y)}", other.seal(f"banidx:{_shard('host', y)}", json.dumps([f"host:{y}"]).encode()))
    seq = int(c.get("banseq")) + 1
    c.append_log(other.seal(f"banlog:{seq}", json.dumps({"op": "add", "ban": {**payload(real), "name": y}}).encode()))
    # A real 1h ban made permanent: its expiry changed with the MAC kept, and (another
    # real ban) rewritten under another cluster's key.
    tampered = c.get("ban:host:127.0.3.21")
    assert tampered is not None
    c.set("ban:host:127.0.3.21", with_payload(tampered, {**payload(tampered), "expires_at": None}))
    c.set("ban:host:127.0.3.22", other.seal("ban:host:127.0.3.22", json.dumps({**payload(tampered), "name": "127.0.3.22",
                                                                               "expires_at": None}).encode()))  # fmt: skip

    h3 = c.host("h3")
    assert wait_for(lambda: refused(h3, "127.0.3.20"), timeout=10)  # real bans reach the late host
    assert c.rejected(h3, "ban") >= 2 and c.rejected(h3, "banidx") >= 2
    assert not refused(h3, x) and not refused(h3, y)
    assert not refused(h2, y) and not refused(h1, y)  # the other cluster's log entry too
    late = {b["name"]: b for b in bans_json(h3)}
    assert x not in late and y not in late
    for ip in ("127.0.3.21", "127.0.3.22"):  # never made permanent; the running hosts keep the real ban
        assert late.get(ip, {}).get("expires_at", 0) is not None
        assert {b["name"]: b for b in bans_json(h2)}[ip]["expires_at"] is not None
    # Logged once per interval, with the server the record came from.
    def mac_lines() -> list[str]:
        return [ln for ln in h3.logs().splitlines() if "without a valid MAC" in ln]

    lines = wait_for(mac_lines, timeout=5)  # log lines may be written in batches
    assert 1 <= len(lines) <= 2 and c.mc.address in lines[0], lines
    h3.stop()


def test_forged_revocation_list_cannot_delete_other_sessions(cluster):
    """A user ban revokes the sessions on the user's list; a forged list naming another
    user's session is ignored, so that session stays."""
    from ftpcluster.cluster.tls_revoke import memcache_name, pack_ids

    c = cluster
    h1 = c.hosts[0]
    sid = bytes(range(32))
    c.set("tls:" + sid.hex(), b"stands for another user's sealed session")
    c.set(memcache_name("mallory"), pack_ids([sid]))
    base = c.rejected(h1, "tlsuser")
    assert cli("ban", "user", "mallory", "--for", "1h", config=h1.config).returncode == 0
    assert wait_for(lambda: c.rejected(h1, "tlsuser") > base, timeout=10)
    assert c.get("tls:" + sid.hex()) is not None


@pytest.mark.skipif(not have("openssl"), reason="openssl not installed")
def test_key_rotation_keeps_bans_and_sessions(cluster, tmp_path):
    c = cluster
    h1, h2 = c.hosts[:2]
    key = c.tmp / "cluster.key"
    sess = tmp_path / "s.pem"
    assert "\nNew, TLSv1." in s_client(h1, "tls1_2", f"-sess_out {sess}")
    ban(h2, "127.0.3.30", "--for", "1h")
    assert wait_for(lambda: refused(h1, "127.0.3.30"), timeout=10)
    old_id = key.read_text().split("\n")[2].split()[0]
    # An index shard emptied by pruning and never written again, sealed under the old key.
    idle = next(f"banidx:{i}" for i in range(16) if c.get(f"banidx:{i}") is None)
    c.set(idle, RecordMac(load_secrets(key), NS).seal(idle, b"[]"))
    assert cli("key", "generate", "--out", str(key)).returncode == 0  # rotate: the old key kept, retired now
    assert f"{old_id} " in key.read_text() and "retired=" in key.read_text()

    assert cli("reload", config=h1.config).returncode == 0  # h1 first: it writes under the new key
    ban(h2, "127.0.3.31", "--for", "1h")  # h2 still writes under the old one: h1 accepts it (overlap)
    assert wait_for(lambda: refused(h1, "127.0.3.31"), timeout=10)
    assert cli("reload", config=h2.config).returncode == 0
    ban(h1, "127.0.3.32", "--for", "1h")
    assert wait_for(lambda: refused(h2, "127.0.3.32"), timeout=10)
    # No index shard is left under the old key, also none that no ban of a host that
    # reloaded touched: it would be refused (counted as forged) after the overlap.
    old_hex = b"%08x" % int(old_id)
    shards = [f"banidx:{i}" for i in range(16)]
    assert any(c.get(s) for s in shards)
    assert wait_for(lambda: all(v[3:11] != old_hex for v in map(c.get, shards) if v), timeout=10), \
        [(s, v[:11]) for s in shards if (v := c.get(s))]
    for ip in ("127.0.3.30", "127.0.3.31", "127.0.3.32"):
        assert refused(h1, ip) and refused(h2, ip), ip
    assert cli("permit", "host", "127.0.3.30", config=h1.config).returncode == 0
    assert wait_for(lambda: not refused(h2, "127.0.3.30"), timeout=10)
    # A session sealed under the old key before the rotation still resumes on the other host,
    # and one made after it (new key) does too.
    again = s_client(h2, "tls1_2", f"-sess_in {sess}")
    assert "\nReused, TLSv1." in again, again[-1500:]
    assert "\nNew, TLSv1." in s_client(h2, "tls1_2", f"-sess_out {sess}")
    assert "\nReused, TLSv1." in s_client(h1, "tls1_2", f"-sess_in {sess}")
