"""Two hosts (two supervisors with their own state) that share only memcached
agree on bans: manual and automatic bans reach the other host, permits lift
them everywhere, a host started later loads the bans in force, and memcached
outages cause no FTP error."""

from __future__ import annotations

import ftplib
import json
import socket
import time

import pytest

from .support_server import cli
from .support_server import wait_for
from .test_bans import bans_json, greet, login

pytestmark = pytest.mark.slow  # multi-host: `make test` runs it, -m "not slow" leaves it out


def two_hosts(server_factory, memcached, n_mc: int = 2, replicas: int = 2, **extra):
    mcs = memcached(n_mc)
    section = {"enabled": True, "servers": [m.address for m in mcs], "replicas": replicas, "timeout": "200ms",
               "connect_failures": 2, "probe_interval": "300ms"}  # fmt: skip
    hosts = [server_factory(name=n, memcache=section, **extra) for n in ("h1", "h2")]
    return mcs, hosts


def test_manual_ban_and_permit_reach_the_other_host(server_factory, memcached):
    mcs, (h1, h2) = two_hosts(server_factory, memcached)
    assert cli("ban", "host", "127.0.0.30", "--for", "1h", "--reason", "abuse", config=h1.config).returncode == 0
    assert greet(h1, "127.0.0.30").startswith(b"530")
    assert wait_for(lambda: greet(h2, "127.0.0.30").startswith(b"530"), timeout=10)
    key = "get ftpcluster:v1:ban:host:127.0.0.30"
    stored = [m.command(key) for m in mcs]
    assert sum(r.startswith(b"VALUE") for r in stored) == 2  # both replicas, versioned and namespaced keys
    raw = stored[0].split(b"\r\n")[1] if stored[0].startswith(b"VALUE") else stored[1].split(b"\r\n")[1]
    assert raw.startswith(b"m1.")  # a MAC under the cluster key, then the readable record
    value = json.loads(raw.split(b".", 3)[3])
    assert value["reason"] == "abuse" and value["kind"] == "host" and value["expires_at"] > time.time()
    b2 = {(b["name"], b["origin"]) for b in bans_json(h2)}
    assert ("127.0.0.30", "cluster") in b2
    # A permit on the *other* host lifts it everywhere (ProFTPD leaves the cached ban in force).
    assert cli("permit", "host", "127.0.0.30", config=h2.config).returncode == 0
    assert wait_for(lambda: greet(h1, "127.0.0.30").startswith(b"220"), timeout=10)
    assert greet(h2, "127.0.0.30").startswith(b"220")
    # A permit is a MAC'd removal record on every replica (a deleted key would not lift it)
    assert all(b'"removed":true' in m.command(key) for m in mcs)
    # A ban counts the hosts it reaches; a host that stopped takes its record out at once
    # (it was counted for another 30 s).
    hosts_seen = lambda: len(h1.status().get("cluster", {}).get("hosts", []))  # noqa: E731
    assert wait_for(lambda: hosts_seen() == 2, timeout=10)
    r = cli("ban", "host", "127.0.0.33", "--for", "1m", config=h1.config)
    assert r.stdout.endswith("on 2 hosts\n"), r.stdout
    h2.stop()
    assert wait_for(lambda: hosts_seen() == 1, timeout=10), "the stopped host is still counted"


def test_automatic_ban_on_one_host_refused_on_the_other(server_factory, memcached):
    rule = {"event": "MaxLoginAttempts", "threshold": 1, "window": "1m", "duration": "1h"}
    _, (h1, h2) = two_hosts(server_factory, memcached, server={"max_login_attempts": 1}, ban={"rules": [rule]})
    with pytest.raises(ftplib.error_perm):
        login(h1, "127.0.0.31", password="wrong")
    assert wait_for(lambda: greet(h1, "127.0.0.31").startswith(b"530"))
    assert wait_for(lambda: greet(h2, "127.0.0.31").startswith(b"530"), timeout=10)
    login(h2, "127.0.0.32").quit()


def test_host_started_later_loads_bans_in_force(server_factory, memcached):
    mcs = memcached(1)
    section = {"enabled": True, "servers": [mcs[0].address]}
    h1 = server_factory(name="h1", memcache=section)
    assert cli("ban", "user", "mallory", config=h1.config).returncode == 0
    assert cli("ban", "host", "127.0.0.33", "--for", "1h", config=h1.config).returncode == 0
    h2 = server_factory(name="h2", memcache=section)
    assert greet(h2, "127.0.0.33").startswith(b"530") or wait_for(lambda: greet(h2, "127.0.0.33").startswith(b"530"))
    names = {b["name"] for b in bans_json(h2)}
    assert {"mallory", "127.0.0.33"} <= names


def test_memcached_outage_causes_no_ftp_error_and_servers_rejoin(server_factory, memcached):
    mcs, (h1, h2) = two_hosts(server_factory, memcached)
    for m in mcs:
        m.stop()
    # Bans still work locally; FTP still works.
    assert cli("ban", "host", "127.0.0.34", config=h1.config).returncode == 0
    assert greet(h1, "127.0.0.34").startswith(b"530")
    for _ in range(5):
        login(h1, "127.0.0.35").quit()

    def servers_down() -> bool:
        st = json.loads(cli("status", "--json", config=h1.config).stdout)
        return all(not s["up"] for s in st["memcache"]["servers"])

    assert wait_for(servers_down, timeout=10)
    for m in mcs:
        m.start()

    def servers_up() -> bool:
        st = json.loads(cli("status", "--json", config=h1.config).stdout)
        return all(s["up"] for s in st["memcache"]["servers"])

    assert wait_for(servers_up, timeout=10)
    # A ban made after the outage propagates again.
    assert cli("ban", "host", "127.0.0.36", config=h1.config).returncode == 0
    assert wait_for(lambda: greet(h2, "127.0.0.36").startswith(b"530"), timeout=10)


def test_one_replica_down_keeps_bans_readable(server_factory, memcached):
    mcs, (h1, h2) = two_hosts(server_factory, memcached, n_mc=3, replicas=2)
    mcs[0].stop()
    assert cli("ban", "host", "127.0.0.37", config=h1.config).returncode == 0
    assert wait_for(lambda: greet(h2, "127.0.0.37").startswith(b"530"), timeout=10)


def test_garbage_in_memcached_is_not_trusted(server_factory, memcached):
    """Unparsable entries, wrong types and a well-formed ban with an invalid name, in
    the change log and in the index: none becomes a ban, and the sync carries on."""
    mcs, (h1, h2) = two_hosts(server_factory, memcached, n_mc=1, replicas=1)
    m = mcs[0]
    bad = json.dumps({"v": 1, "kind": "host", "name": "1.2.3.4/99", "expires_at": None, "reason": "forged"})
    for key, value in [("ftpcluster:v1:banlog:1", b"{not json"), ("ftpcluster:v1:banidx:0", b'["host:1.2.3.4", 5]'),
                       ("ftpcluster:v1:banlog:2", ('{"op":"add","ban":%s}' % bad).encode()),
                       ("ftpcluster:v1:ban:host:1.2.3.4", bad.encode()),
                       ("ftpcluster:v1:banseq", b"2")]:  # fmt: skip
        with socket.create_connection(("127.0.0.1", m.port), timeout=5) as s:
            s.sendall(f"set {key} 0 0 {len(value)}\r\n".encode() + value + b"\r\n")
            assert s.recv(100).startswith(b"STORED")
    login(h1, "127.0.0.38").quit()
    assert cli("ban", "host", "127.0.0.39", config=h1.config).returncode == 0  # banlog:3, read after 1 and 2
    assert wait_for(lambda: greet(h2, "127.0.0.39").startswith(b"530"), timeout=10)
    assert not [b for b in bans_json(h2) if "1.2.3.4" in b["name"]], bans_json(h2)


def test_event_counters_add_up_across_hosts(server_factory, memcached):
    """Two failed sessions on one host and one on the other reach a threshold of 3
    that neither host reaches alone (ProFTPD counts per host: proftpd#1355)."""
    rule = {"event": "MaxLoginAttempts", "threshold": 3, "window": "1m", "duration": "1h"}
    _, (h1, h2) = two_hosts(server_factory, memcached, server={"max_login_attempts": 1}, ban={"rules": [rule]})
    for host in (h1, h1, h2):
        with pytest.raises(ftplib.error_perm):
            login(host, "127.0.0.40", password="wrong")
        time.sleep(0.2)
    assert wait_for(lambda: greet(h2, "127.0.0.40").startswith(b"530"), timeout=10)
    assert wait_for(lambda: greet(h1, "127.0.0.40").startswith(b"530"), timeout=10)
    login(h1, "127.0.0.41").quit()


def test_one_memcached_killed_nothing_lost_late_host_knows_every_ban(server_factory, memcached):
    mcs, (h1, h2) = two_hosts(server_factory, memcached, n_mc=3, replicas=2)
    names = [f"127.0.1.{i}" for i in range(1, 6)]
    for n in names:
        assert cli("ban", "host", n, "--for", "1h", config=h1.config).returncode == 0
    assert wait_for(lambda: greet(h2, names[-1]).startswith(b"530"), timeout=10)
    mcs[0].stop()
    section = {"enabled": True, "servers": [m.address for m in mcs], "replicas": 2, "timeout": "200ms",
               "connect_failures": 2, "probe_interval": "300ms"}  # fmt: skip
    h3 = server_factory(name="h3", memcache=section)
    assert wait_for(lambda: set(names) <= {b["name"] for b in bans_json(h3)}, timeout=10)
    assert all(greet(h3, n).startswith(b"530") for n in names)


def test_all_memcached_restarted_state_converges(server_factory, memcached):
    mcs, (h1, h2) = two_hosts(server_factory, memcached)
    assert cli("ban", "host", "127.0.2.1", config=h1.config).returncode == 0
    assert wait_for(lambda: greet(h2, "127.0.2.1").startswith(b"530"), timeout=10)
    for m in mcs:
        m.stop()
    # During the outage: FTP works, local bans hold, changes are made.
    login(h1, "127.0.2.9").quit()
    assert cli("ban", "host", "127.0.2.2", config=h1.config).returncode == 0
    assert greet(h1, "127.0.2.2").startswith(b"530")
    assert cli("permit", "host", "127.0.2.1", config=h1.config).returncode == 0
    for m in mcs:
        m.start()  # empty servers
    assert wait_for(lambda: greet(h2, "127.0.2.2").startswith(b"530"), timeout=15)
    assert wait_for(lambda: greet(h2, "127.0.2.1").startswith(b"220"), timeout=15)
    names = {b["name"] for b in bans_json(h2)}
    assert "127.0.2.2" in names and "127.0.2.1" not in names
    # Emptied (flush_all) and at once a new ban on the other host, which starts the
    # counter again at 1: the hosts must still see that the servers lost everything and
    # write their bans back (a host started later finds them only there).
    record = lambda ip: any(m.command(f"get ftpcluster:v1:ban:host:{ip}").startswith(b"VALUE") for m in mcs)  # noqa: E731
    assert wait_for(lambda: record("127.0.2.2"), timeout=10)
    for m in mcs:  # the counter back at 1 at once, as another host's ban right after the flush does
        assert m.command("flush_all").startswith(b"OK") and m.command("set ftpcluster:v1:banseq 0 0 1\r\n1").startswith(b"STORED")
    assert cli("ban", "host", "127.0.2.3", "--for", "10m", config=h2.config).returncode == 0
    assert wait_for(lambda: record("127.0.2.2") and record("127.0.2.3"), timeout=15), "bans lost with the flush stay lost"
    # A counter that is not a number (written by someone else) does not stop propagation.
    for m in mcs:
        assert m.command("set ftpcluster:v1:banseq 0 0 7\r\ngarbage").startswith(b"STORED")
    assert cli("ban", "host", "127.0.2.4", "--for", "10m", config=h1.config).returncode == 0
    assert wait_for(lambda: greet(h2, "127.0.2.4").startswith(b"530"), timeout=15), "a garbage banseq stopped propagation"


def _index_names(m, kind: str, name: str) -> set[str]:
    """The entries of the index shard that names kind:name, as stored (MAC'd JSON)."""
    from ftpcluster.cluster.ban_sync import _shard

    reply = m.command(f"get ftpcluster:v1:banidx:{_shard(kind, name)}")
    if not reply.startswith(b"VALUE"):
        return set()
    return set(json.loads(reply.split(b"\r\n")[1].split(b".", 3)[3]))


def test_index_forgets_bans_that_expired(server_factory, memcached):
    """A ban that ran out is gone from memcached with its record's TTL, and its index
    entry goes at the next full reload (here: a host starting), so the index does not
    grow with every ban ever made; a ban still in force keeps its entry."""
    mcs = memcached(1)
    section = {"enabled": True, "servers": [mcs[0].address]}
    h1 = server_factory(name="h1", memcache=section)
    assert cli("ban", "host", "127.0.0.60", "--for", "1s", config=h1.config).returncode == 0
    assert cli("ban", "host", "127.0.0.61", "--for", "1h", config=h1.config).returncode == 0
    assert wait_for(lambda: "host:127.0.0.60" in _index_names(mcs[0], "host", "127.0.0.60"), timeout=10)
    key = "get ftpcluster:v1:ban:host:127.0.0.60"
    assert wait_for(lambda: not mcs[0].command(key).startswith(b"VALUE"), timeout=15), "record never expired"
    server_factory(name="h2", memcache=section)  # its first sync is a full reload
    assert wait_for(lambda: "host:127.0.0.60" not in _index_names(mcs[0], "host", "127.0.0.60"), timeout=15)
    assert "host:127.0.0.61" in _index_names(mcs[0], "host", "127.0.0.61")


def test_ring_missing_is_sure_or_empty(tmp_path, memcached):
    """Ring.missing (what the index prune trusts) names only keys every replica was
    asked for and none holds, and nothing at all while a server is down."""
    from ftpcluster import config as config_mod
    from ftpcluster.cluster.memcache_ring import Ring

    mcs = memcached(2)
    cfg = config_mod.from_dict({"memcache": {"enabled": True, "servers": [m.address for m in mcs], "replicas": 2,
                                             "timeout": "200ms", "connect_failures": 1}}, tmp_path / "f.toml")  # fmt: skip
    ring = Ring(cfg)
    assert ring.set("ban:host:1", b"x", 0) == 2
    names = ["ban:host:1", "ban:host:2", "ban:host:3"]
    assert ring.missing(names) == {"ban:host:2", "ban:host:3"}
    mcs[1].stop()
    ring.get("ban:host:2")  # a failed call: the server is ejected (connect_failures = 1)
    ring.get("ban:host:3")
    assert ring.missing(names) == set()
    ring.close()


def test_ring_reads_the_next_replica_when_one_lost_its_data(tmp_path, memcached):
    """A replica that restarted empty does not hide the copy on the other one: get and
    get_many fall through to the next replica on a miss (a counter's read does not)."""
    from ftpcluster import config as config_mod
    from ftpcluster.cluster.memcache_ring import Ring

    mcs = memcached(2)
    cfg = config_mod.from_dict({"memcache": {"enabled": True, "servers": [m.address for m in mcs], "replicas": 2,
                                             "timeout": "200ms"}}, tmp_path / "f.toml")  # fmt: skip
    ring = Ring(cfg)
    names = [f"ban:host:10.0.0.{i}" for i in range(20)]
    for m in mcs:  # each server in turn is the one that lost everything
        for n in names:
            assert ring.set(n, n.encode(), 0) == 2
        assert m.command("flush_all").startswith(b"OK")
        assert all(ring.get(n) == n.encode() for n in names)
        assert ring.get_many(names) == {n: n.encode() for n in names}
    first = {ring.targets(n)[0].address for n in names}
    assert len(first) == 2  # both servers were some name's first replica, so both paths ran
    assert any(ring.get(n, next_on_miss=False) is None for n in names)  # the flushed first replica's answer
    ring.close()


def test_index_prune_keeps_a_ban_published_again_meanwhile(tmp_path, memcached):
    """A host prunes an index entry whose record expired; another host bans the same
    name again between the prune's check and its index edit. The entry must stay
    (the record exists: a host started later finds the ban only through it)."""
    from ftpcluster import config as config_mod
    from ftpcluster.cluster.ban_engine import BanEngine
    from ftpcluster.cluster.ban_sync import BanSync
    from ftpcluster.cluster.ban_table import Ban, BanTable
    from ftpcluster.cluster.memcache_ring import Ring, key_prefix
    from ftpcluster.cluster.record_mac import RecordMac
    from ftpcluster.cluster.session_seal import Secret

    mcs = memcached(2)
    cfg = config_mod.from_dict({"memcache": {"enabled": True, "servers": [m.address for m in mcs], "replicas": 2,
                                             "timeout": "200ms"}}, tmp_path / "f.toml")  # fmt: skip
    mac = RecordMac([Secret(1, b"p" * 32)], key_prefix(cfg))
    syncs = []
    for name in ("ha", "hb"):
        table = BanTable(tmp_path / f"{name}.shm", capacity=64, create=True)
        syncs.append(BanSync(BanEngine(cfg, table, None, origin_host=name), Ring(cfg), name, mac))
    a, b = syncs
    now = time.time()
    ban = Ban("host", "127.0.9.1", now + 3600, "test", origin="local", created=now, origin_host="hb")
    entry, record = "host:127.0.9.1", "ban:host:127.0.9.1"
    b.publish(ban)
    assert entry in a._read_index()
    b.ring.delete(record)  # the record expired
    real_missing = a.ring.missing
    checks: list[set[str]] = []

    def missing_then_reban(names):
        out = real_missing(names)
        if not checks:
            b.publish(ban)  # the other host bans the name again right after the first check
        checks.append(out)
        return out

    a.ring.missing = missing_then_reban  # type: ignore[method-assign]
    a._prune_index({entry})
    assert checks[0] == {record}, checks  # the first check saw the record gone
    assert entry in a._read_index(), "the index lost a ban whose record exists"
    a.ring.missing = real_missing  # type: ignore[method-assign]
    b.ring.delete(record)  # now truly gone: pruned
    a._prune_index({entry})
    assert entry not in a._read_index()
    for s in syncs:
        s.ring.close()
        s.engine.table.close()
