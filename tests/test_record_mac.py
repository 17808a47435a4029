"""Records in memcached carry a MAC under the cluster key: bound to the key name and
namespace, refused when tampered with or made under another cluster's key, and
accepted under a rotated-out key only for the configured overlap."""

from __future__ import annotations

import json
import time

import structlog
import structlog.testing
from hypothesis import given, settings, strategies as st

from ftpcluster.cluster import record_mac
from ftpcluster.cluster.record_mac import RecordMac
from ftpcluster.cluster.session_seal import Sealer, Secret, generate_key_file, load_secrets, parse_key_file

PREFIX = "ftpcluster:v1:"


def mac_for(*secrets: Secret, prefix: str = PREFIX, overlap: float | None = None, count=None) -> RecordMac:
    return RecordMac(list(secrets), prefix, overlap, count)


A, B = Secret(1, b"a" * 32), Secret(2, b"b" * 32)


def test_seal_verify_bound_to_name_and_payload():
    m = mac_for(A)
    rec = m.seal("banlog:7", b'{"op":"add"}')
    assert rec.startswith(b"m1.00000001.") and rec.endswith(b'{"op":"add"}')  # readable payload
    assert m.verify("banlog:7", rec) == b'{"op":"add"}'
    assert m.verify("banlog:8", rec) is None  # copied to a later sequence number
    assert m.verify("ban:host:1.2.3.4", rec) is None
    assert mac_for(A, prefix="other:v1:").verify("banlog:7", rec) is None  # another namespace
    assert m.verify("banlog:7", rec.replace(b'"add"', b'"del"')) is None
    assert m.verify("banlog:7", rec.replace(b"m1.00000001", b"m1.0000_001")) is None  # header is bound too
    assert m.verify("banlog:7", b'{"op":"add"}') is None  # no MAC at all (an old or foreign writer)


def test_changed_expiry_is_refused():
    m = mac_for(A)
    rec = m.seal("ban:host:10.0.0.1", json.dumps({"expires_at": 100.0}).encode())
    assert m.verify("ban:host:10.0.0.1", rec.replace(b"100.0", b"9999999999.0")) is None


def test_other_cluster_key_is_refused():
    assert mac_for(B).verify("x", mac_for(A).seal("x", b"v")) is None
    # same key id, other material: still refused
    assert mac_for(Secret(1, b"c" * 32)).verify("x", mac_for(A).seal("x", b"v")) is None


def test_rotation_overlap(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    old = mac_for(*load_secrets(key), overlap=3600)
    rec = old.seal("ban:user:bob", b"v")
    generate_key_file(key)  # rotate: the old key is kept, stamped retired now
    secrets = load_secrets(key)
    assert secrets[1].retired is not None and abs(secrets[1].retired - time.time()) < 5
    new = mac_for(*secrets, overlap=3600)
    assert new.verify("ban:user:bob", rec) == b"v"  # old records stay valid in the overlap
    assert old.verify("x", new.seal("x", b"w")) is None  # a host without the new key refuses new ones
    ended = [secrets[0], Secret(secrets[1].key_id, secrets[1].material, time.time() - 3601)]
    assert mac_for(*ended, overlap=3600).verify("ban:user:bob", rec) is None  # overlap over
    assert Sealer(ended, overlap=3600).open(Sealer([ended[1]]).seal(b"s")) is None  # sessions too
    assert Sealer(ended, overlap=None).open(Sealer([ended[1]]).seal(b"s")) == b"s"


def test_key_file_retired_stamp_round_trip():
    text = f"5 {'11' * 32}\n6 {'22' * 32} retired=1700000000\n"
    got = parse_key_file(text)
    assert [s.retired for s in got] == [None, 1700000000.0]


def test_rejections_counted_and_logged_once_per_interval(monkeypatch):
    # capture_logs with a fresh logger, not capsys: an earlier test in this process may
    # have configured structlog (cached loggers, another stream).
    monkeypatch.setattr(record_mac, "log", structlog.get_logger("ftpcluster.memcache"))
    counted: list[tuple[str, tuple[str, ...]]] = []
    m = mac_for(A, count=lambda n, l: counted.append((n, l)))

    def mac_lines(logs: list[dict]) -> list[dict]:
        return [e for e in logs if "without a valid MAC" in e["event"]]

    with structlog.testing.capture_logs() as logs:
        assert m.open("banlog", "banlog:1", None) is None and not counted  # a miss is not a rejection
        for _ in range(3):
            assert m.open("banlog", "banlog:1", b"forged", server="127.0.0.1:11211") is None
    assert counted == [("ftpcluster_memcache_rejected_total", ("banlog",))] * 3
    assert len(mac_lines(logs)) == 1  # the first at once, with its server
    assert m.rejected == {("banlog", "127.0.0.1:11211"): 2}  # the next ones wait for the interval
    with structlog.testing.capture_logs() as logs:
        m.open("ban", "ban:host:1.1.1.1", b"x", server="127.0.0.1:11211")
    assert not mac_lines(logs)
    m._next_log = 0.0  # the interval is over: one line per (kind, server) with its count
    with structlog.testing.capture_logs() as logs:
        m.open("ban", "ban:host:1.1.1.1", b"x", server="127.0.0.1:11211")
    lines = mac_lines(logs)
    assert len(lines) == 2 and [e.get("count") for e in lines] == [2, 2]
    assert all(e.get("server") == "127.0.0.1:11211" for e in lines)


def test_counter_names_are_keyed():
    assert mac_for(A).counter_name("MaxLoginAttempts|host|10.0.0.1|60") == mac_for(A).counter_name(
        "MaxLoginAttempts|host|10.0.0.1|60"
    )
    assert mac_for(A).counter_name("e|host|10.0.0.1") != mac_for(B).counter_name("e|host|10.0.0.1")
    assert mac_for(A).counter_name("e|host|10.0.0.1") != mac_for(A).counter_name("e|host|10.0.0.2")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_verify_never_raises(blob):
    m = mac_for(A)
    assert m.verify("k", blob) is None
    assert m.verify("k", b"m1.00000001." + blob) is None
