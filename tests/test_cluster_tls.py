"""Cluster TLS sessions: two hosts (supervisors) sharing memcached, one certificate
and one cluster key; a session made on one resumes on the other through the
sealed memcached store (session ids, TLS 1.3 stateful tickets) or through
cluster ticket keys."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from .support_server import cli, needs, wait_for
from .test_ftps import ReusingFTP_TLS, client_ctx, s_client

pytestmark = pytest.mark.slow  # multi-host: `make test` runs it, -m "not slow" leaves it out


def tls_hosts(server_factory, memcached, tmp_path, tickets: str, n: int = 2, nodes: int = 1):
    mcs = memcached(1)
    key = tmp_path / "session.key"
    if not key.exists():
        assert cli("key", "generate", "--out", str(key)).returncode == 0
    tls = {"session_cache": "memcache", "session_tickets": tickets, "session_key_file": str(key)}
    mc = {"enabled": True, "servers": [m.address for m in mcs], "timeout": "200ms", "connect_failures": 2}
    hosts = [server_factory(name=f"t{i}", implicit=True, tls=tls, memcache=mc, start=False) for i in range(n)]
    for h in hosts[1:]:  # one certificate for the cluster
        for name in ("cert.pem", "key.pem"):
            shutil.copy(hosts[0].dir / "certs" / name, h.dir / "certs" / name)
    for h in hosts:
        h.start(nodes=nodes)
    return mcs, hosts


@pytest.mark.parametrize("tickets", ["off", "cluster"])
@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_openssl_resumes_on_another_host(server_factory, memcached, tmp_path, version, tickets):
    _, (a, b) = tls_hosts(server_factory, memcached, tmp_path, tickets)
    sess = tmp_path / f"{version}-{tickets}.pem"
    first = s_client(a, version, f"-sess_out {sess}")
    assert "\nNew, TLSv1." in first, first[-1500:]
    second = s_client(b, version, f"-sess_in {sess}")
    assert "\nReused, TLSv1." in second, second[-1500:]


def tls_keys(mc) -> set[str]:
    """The TLS session keys in memcached now (metadump lists every key)."""
    with socket.create_connection(("127.0.0.1", mc.port), timeout=5) as s:
        s.sendall(b"lru_crawler metadump all\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return {line.split()[0] for line in data.decode().splitlines() if "%3Atls%3A" in line}


def wait_stored(mc, before: set[str]) -> None:
    """A session new since `before` reached memcached (a background thread writes it)."""
    assert wait_for(lambda: tls_keys(mc) - before), "the new session never reached memcached"


@pytest.mark.parametrize("maxv", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_python_session_resumes_across_hosts_and_data_reuse_works(server_factory, memcached, tmp_path, maxv):
    (mc,), hosts = tls_hosts(server_factory, memcached, tmp_path, "off")
    ctx = client_ctx(maxv)
    session = None
    reused = []
    for i in range(6):
        h = hosts[i % 2]
        keys = tls_keys(mc)
        with socket.create_connection((h.host, h.implicit_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, session=session) as s:
                f = s.makefile("rwb")
                assert f.readline().startswith(b"220")
                f.write(b"QUIT\r\n")
                f.flush()
                f.readline()
                if session is not None:
                    reused.append(s.session_reused)
                session = s.session
        if maxv == ssl.TLSVersion.TLSv1_3 or not reused or not reused[-1]:  # a new session was made
            wait_stored(mc, keys)
    assert reused and all(reused), reused
    for h in hosts:  # protected data channels still resume their control session
        (h.home / "x").write_bytes(b"data")
        ftp = ReusingFTP_TLS(context=client_ctx(maxv), timeout=10)
        ftp.connect(h.host, h.port)
        ftp.login(h.user, h.password)
        ftp.prot_p()
        got: list[bytes] = []
        ftp.retrbinary("RETR x", got.append)
        assert b"".join(got) == b"data"
        ftp.quit()


def test_memcached_entry_is_sealed(server_factory, memcached, tmp_path):
    mcs, (a, _) = tls_hosts(server_factory, memcached, tmp_path, "off")
    out = s_client(a, "tls1_2", f"-sess_out {tmp_path / 's.pem'}")
    sid = re.search(r"Session-ID: ([0-9A-F]+)", out).group(1).lower()
    master = bytes.fromhex(re.search(r"Master-Key: ([0-9A-F]+)", out).group(1))
    raw = b""
    for _ in range(50):
        raw = mcs[0].command(f"get ftpcluster:v1:tls:{sid}")
        if raw.startswith(b"VALUE"):
            break
        time.sleep(0.1)
    assert raw.startswith(b"VALUE"), raw
    value = raw.split(b"\r\n", 1)[1]
    assert value.startswith(b"FCs1")  # our sealed format with a key id
    assert master not in value and master[:16] not in value


def test_memcached_outage_degrades_to_full_handshakes(server_factory, memcached, tmp_path):
    mcs, (a, b) = tls_hosts(server_factory, memcached, tmp_path, "off")
    mcs[0].stop()
    sess = tmp_path / "s.pem"
    assert "\nNew, TLSv1." in s_client(a, "tls1_2", f"-sess_out {sess}")
    other = s_client(b, "tls1_2", f"-sess_in {sess}")
    assert "\nNew, TLSv1." in other and "221" in other  # a full handshake, the session works
    assert "\nReused, TLSv1." in s_client(a, "tls1_2", f"-sess_in {sess}")  # L1 still serves the host


@needs("curl", "lftp")
def test_curl_and_lftp_on_each_host(server_factory, memcached, tmp_path):
    _, hosts = tls_hosts(server_factory, memcached, tmp_path, "cluster")
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(300_000))
    for h in hosts:
        r = subprocess.run(["curl", "-sS", "-k", "--ssl-reqd", "-T", str(src), h.url("/up.bin")],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert r.returncode == 0, r.stderr
        script = (
            "set ssl:verify-certificate no; set ftp:ssl-force true; set ftp:ssl-protect-data true; "
            f"set net:max-retries 1; open -u {h.user},{h.password} -p {h.port} {h.host}; get up.bin -o {tmp_path}/back.bin"
        )
        r = subprocess.run(["lftp", "-c", script], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
        (tmp_path / "back.bin").unlink()


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_rss_flat_over_5000_resumptions(server_factory, memcached, tmp_path):
    from .support_cluster import node_pids

    _, (a,) = tls_hosts(server_factory, memcached, tmp_path, "off", n=1)
    (pid,) = node_pids(a).values()
    ctx = client_ctx(ssl.TLSVersion.TLSv1_2)

    def resume(count: int, session):  # type: ignore[no-untyped-def]
        for _ in range(count):
            with socket.create_connection((a.host, a.implicit_port), timeout=10) as raw:
                with ctx.wrap_socket(raw, session=session) as s:
                    s.recv(100)
                    assert session is None or s.session_reused
                    session = session or s.session
        return session

    session = resume(1, None)
    session = resume(500, session)  # warm up: caches, allocator arenas
    before = _rss_kb(pid)
    resume(5000, session)
    after = _rss_kb(pid)
    assert after - before < 8 * 1024, (before, after)


def test_status_and_metrics_show_the_tls_mode(server_factory, memcached, tmp_path):
    import json
    import urllib.request

    from .support_server import free_port

    port = free_port()
    mcs = memcached(1)
    key = tmp_path / "k"
    assert cli("key", "generate", "--out", str(key)).returncode == 0
    srv = server_factory(tls={"session_cache": "memcache", "session_tickets": "cluster", "session_key_file": str(key)},
                         memcache={"enabled": True, "servers": [mcs[0].address]}, metrics={"listen": f"127.0.0.1:{port}"})  # fmt: skip
    st = json.loads(cli("status", "--json", config=srv.config).stdout)
    assert st["tls"]["session_cache"] == "shm+memcache" and st["tls"]["session_tickets"] == "cluster"
    assert "tls         session cache shm+memcache, tickets cluster" in cli("status", config=srv.config).stdout
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'ftpcluster_tls_mode{session_cache="shm+memcache",session_tickets="cluster"} 1' in text
    # A resumption through the cache moves the L1 counters.
    out = s_client(srv, "tls1_2", f"-sess_out {tmp_path / 's'} -no_ticket")
    assert "\nNew" in out
    assert "\nReused" in s_client(srv, "tls1_2", f"-sess_in {tmp_path / 's'} -no_ticket")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for result in ("store", "hit"):
        assert re.search(r'ftpcluster_tls_session_cache_total\{level="L1",result="%s"\} [1-9]' % result, text), text[-3000:]


def implicit_login(h, ctx: ssl.SSLContext, session: ssl.SSLSession | None):  # type: ignore[no-untyped-def]
    """USER, PASS, QUIT over implicit FTPS: (the client's session, resumed?, the PASS reply)."""
    with socket.create_connection((h.host, h.implicit_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, session=session) as s:
            f = s.makefile("rwb")
            f.readline()
            f.write(f"USER {h.user}\r\nPASS {h.password}\r\n".encode())
            f.flush()
            f.readline()
            reply = f.readline()
            f.write(b"QUIT\r\n")
            f.flush()
            f.readline()
            return s.session, s.session_reused, reply


def test_only_sessions_resumable_by_id_are_remembered_for_revocation(server_factory, memcached, tmp_path):
    """TLS 1.3 under stateless tickets resumes from the ticket alone, and each such
    session has a dummy id of its own: a login must not add it to the user's list (a
    shared-memory and a memcached write per login, for an id no client presents),
    nor store the session in the cache (OpenSSL offers every TLS 1.3 ticket to it; a
    control connection issues one per login and more for data connections, and each
    would evict a session some client resumes by id). A TLS 1.2 session's id is
    remembered and the session stored (a client without tickets resumes by it)."""
    from ftpcluster.cluster.tls_cache import open_cache
    from ftpcluster.cluster.tls_revoke import unpack_ids, user_key
    from ftpcluster.config import load

    (mc,), (a,) = tls_hosts(server_factory, memcached, tmp_path, "cluster", n=1)
    l1 = open_cache(load(str(a.config)))
    try:
        session, reused, ctx13 = None, [], client_ctx(ssl.TLSVersion.TLSv1_3)
        keys = tls_keys(mc)
        for _ in range(2):
            session, was_reused, reply = implicit_login(a, ctx13, session)
            assert reply.startswith(b"230"), reply
            reused.append(was_reused)
        assert reused == [False, True]
        assert unpack_ids(l1.get(user_key(a.user))) == []
        f = ReusingFTP_TLS(context=ctx13, timeout=10)  # explicit, with protected transfers (more tickets)
        f.connect(a.host, a.port)
        f.login(a.user, a.password)
        f.prot_p()
        for _ in range(3):
            f.retrlines("LIST", lambda line: None)
        f.quit()
        ctx12 = client_ctx(ssl.TLSVersion.TLSv1_2)
        ctx12.options |= ssl.OP_NO_TICKET  # resumes by session id
        s12, _, reply = implicit_login(a, ctx12, None)
        assert reply.startswith(b"230"), reply
        assert unpack_ids(l1.get(user_key(a.user))) == [s12.id]
        wait_stored(mc, keys)  # the TLS 1.2 session reached memcached (a background thread writes it)...
        assert len(tls_keys(mc) - keys) == 1  # ... and none of the TLS 1.3 ones did
    finally:
        l1.close()


@pytest.mark.parametrize("maxv", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_user_ban_revokes_cached_sessions(server_factory, memcached, tmp_path, maxv):
    (mc,), (a, b) = tls_hosts(server_factory, memcached, tmp_path, "off")
    ctx = client_ctx(maxv)

    def login(h, session):  # type: ignore[no-untyped-def]
        return implicit_login(h, ctx, session)

    keys = tls_keys(mc)
    session, _, reply = login(a, None)
    assert reply.startswith(b"230")
    wait_stored(mc, keys)
    _, reused, _ = login(b, session)
    assert reused  # through memcached on the other host
    # Protected transfers: a TLS 1.3 control connection hands out a fresh ticket (a
    # cached session under tickets "off") for each data connection after the first.
    f = ReusingFTP_TLS(context=ctx, timeout=10)
    f.connect(a.host, a.port)
    f.login(a.user, a.password)
    f.prot_p()
    for _ in range(3):
        f.retrlines("LIST", lambda line: None)
    later = f.sock.session
    f.quit()
    assert cli("ban", "user", "alice", "--for", "1h", config=a.config).returncode == 0
    # The ban and the revocation reach host b through memcached (asynchronously, the
    # revocation after the ban): wait until the sessions no longer resume on each host.
    for h in (a, b):
        for s in (session, later):
            got = wait_for(lambda h=h, s=s: (r := login(h, s)) and not r[1] and r[2].startswith(b"530") and r, 15)
            assert got, f"{h.dir.name}: the banned user's session still resumes or logs in: {login(h, s)[1:]}"


def test_revocation_racing_a_prefetch_leaves_no_session(tmp_path, memcached):
    """The node's memcached thread reads a session from memcached; the user is banned
    and the supervisor revokes the session (memcached, then L1) before the thread puts
    it into L1. The tombstone the revocation left takes it out again, and a session
    still in a replica the delete missed never comes back."""
    from ftpcluster import config as config_mod
    from ftpcluster.cluster.memcache_ring import Ring, key_prefix
    from ftpcluster.cluster.record_mac import RecordMac
    from ftpcluster.cluster.session_seal import Sealer, Secret
    from ftpcluster.cluster.shm_cache import ShmCache
    from ftpcluster.cluster.tls_revoke import remember, revoke_user
    from ftpcluster.cluster.tls_store import TwoLevelStore

    (mc,) = memcached(1)
    cfg = config_mod.from_dict({"memcache": {"enabled": True, "servers": [mc.address], "timeout": "200ms"},
                                "tls": {"session_cache": "memcache"}}, tmp_path / "f.toml")  # fmt: skip
    secrets = [Secret(1, b"s" * 32)]
    counted: list[tuple[str, tuple[str, ...]]] = []
    l1 = ShmCache(tmp_path / "l1.shm", sets=16, create=True)
    store = TwoLevelStore(cfg, l1, Sealer(secrets), lambda n, lb: counted.append((n, lb)), remote=object())
    ring = Ring(cfg)
    mac = RecordMac(secrets, key_prefix(cfg))
    sid, der = b"\x07" * 32, b"session-der-bytes"
    ring.set(store._key(sid), store.sealer.seal(der, aad=sid), 3600)
    remember(l1, "alice", sid, 3600)

    real_get_many = ring.get_many

    def get_then_revoke(names):  # the supervisor revokes right after the thread's read
        got = real_get_many(names)
        revoke_user("alice", l1, ring, mac, 3600)
        return got

    ring.get_many = get_then_revoke  # type: ignore[method-assign]
    assert store._fetch(ring, [sid]) is False
    assert l1.get(sid) is None, "a revoked session came back into L1"
    ring.get_many = real_get_many  # type: ignore[method-assign]
    # A replica that missed the delete still holds it: fetched, and taken out again.
    ring.set(store._key(sid), store.sealer.seal(der, aad=sid), 3600)
    assert store._fetch(ring, [sid]) is False and l1.get(sid) is None
    store.flush_counts()
    assert counted.count(("ftpcluster_tls_session_cache_total", ("L2", "revoked"))) == 2
    # Other sessions are untouched.
    other = b"\x08" * 32
    ring.set(store._key(other), store.sealer.seal(der, aad=other), 3600)
    assert store._fetch(ring, [other]) is True and l1.get(other) == der
    ring.close()
    l1.close()


def test_data_connections_may_offer_the_session_the_login_resumed_from(server_factory, memcached, tmp_path):
    """With stateful TLS 1.3 tickets (tickets "off") OpenSSL issues a resumed login a
    new ticket during the handshake, so the control connection's own session is not
    the one the client resumed with. A client that offers that one again on its data
    connections (on either host) is served, not told 522."""
    import ftplib

    _, hosts = tls_hosts(server_factory, memcached, tmp_path, "off")
    ctx = client_ctx(ssl.TLSVersion.TLSv1_3)
    f = ReusingFTP_TLS(context=ctx, timeout=10)
    f.connect(hosts[0].host, hosts[0].port)
    f.login(hosts[0].user, hosts[0].password)
    f.prot_p()
    f.retrlines("LIST", lambda line: None)  # the ticket has been read
    saved = f.sock.session
    f.quit()

    class ResumesSaved(ReusingFTP_TLS):
        def auth(self):  # type: ignore[no-untyped-def]
            resp = self.voidcmd("AUTH TLS")
            self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host, session=saved)
            self.file = self.sock.makefile(mode="r", encoding=self.encoding)
            return resp

        def ntransfercmd(self, cmd, rest=None):  # type: ignore[no-untyped-def]
            conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
            return self.context.wrap_socket(conn, server_hostname=self.host, session=saved), size

    for h in hosts:
        g = ResumesSaved(context=ctx, timeout=10)
        g.connect(h.host, h.port)
        g.login(h.user, h.password)
        assert g.sock.session_reused, h.dir.name
        g.prot_p()
        for _ in range(3):
            g.retrlines("LIST", lambda line: None)
        g.quit()


def test_listed_agrees_with_unpacking_the_list():
    """remember()'s membership check (no list built) against unpack_ids, on packed
    lists, garbage, truncated lists, ids that also occur inside other ids, and lists
    longer than MAX_IDS (a 17th entry is not in the list)."""
    import random

    from ftpcluster.cluster.tls_revoke import _listed, pack_ids, unpack_ids

    rnd = random.Random(7)
    alphabet = b"\x00\x01\x02\x03 ab"
    for _ in range(20000):
        ids = [bytes(rnd.choice(alphabet[1:]) for _ in range(rnd.randint(1, 4))) for _ in range(rnd.randint(0, 20))]
        raw = pack_ids(ids) + b"".join(bytes((len(i),)) + i for i in ids[16:]) if rnd.random() < 0.8 else \
            bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 30)))  # fmt: skip
        if raw and rnd.random() < 0.2:
            raw = raw[: rnd.randint(0, len(raw))]
        sid = rnd.choice(ids) if ids and rnd.random() < 0.5 else bytes(rnd.choice(alphabet[1:]) for _ in range(rnd.randint(1, 4)))
        assert _listed(raw, sid) == (sid in unpack_ids(raw)), (raw, sid)
