"""Rates and quotas that hold across the cluster, with real clients: two hosts
(two supervisors with their own state) share one real memcached and the users'
homes. alice has the cluster-wide rates of `[limits]` (1 MiB/s each way); bob's
class lifts them; carol has a quota and a maximum upload size.

Rates are measured as total bytes / elapsed wall time at the client: a slow
machine only lowers the figure, so the 10 % bound cannot flake the other way.
The memcached outage test kills memcached and must come last."""

from __future__ import annotations

import ftplib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from .support_memcached import have_memcached, start_memcached
from .support_server import PASSWORD, Server, cli, free_port, make_server, wait_for, wait_port

MiB = 1 << 20
RATE = MiB
HUGE = 64 * MiB
pytestmark = [pytest.mark.skipif(not have_memcached(), reason="memcached is not installed"),
              pytest.mark.slow]  # multi-host: `make test` runs it, -m "not slow" leaves it out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ftpcluster.users import UserRecord, hash_password, load_users, save_users

    tmp = tmp_path_factory.mktemp("limits")
    mcs = start_memcached(1)
    section = {"enabled": True, "servers": [mcs[0].address], "timeout": "200ms", "connect_failures": 2,
               "probe_interval": "300ms"}  # fmt: skip
    limits = {"user_download_rate": "1M", "user_upload_rate": "1M",
              "classes": {"free": {"user_download_rate": "0", "user_upload_rate": "0"},
                          "trickle": {"user_download_rate": "0", "session_download_rate": "2K"}}}  # fmt: skip
    server = {"data_timeout": "1500ms"}  # a throttled transfer must never trip it
    h1 = make_server(tmp / "h1", tls=True, memcache=section, limits=limits, server=server,
                     metrics={"listen": f"127.0.0.1:{free_port()}"})  # fmt: skip
    h2 = make_server(tmp / "h2", memcache=section, limits=limits, server=server)
    homes = tmp / "homes"
    users = load_users(h1.dir / "users.toml")
    pw = hash_password(PASSWORD)
    for name, cls in (("bob", "free"), ("carol", "free"), ("dave", "trickle")):  # in-process: `user add` is covered elsewhere
        (homes / name).mkdir(parents=True)
        users[name] = UserRecord(name, pw, str(homes / name), False, cls, (("max_upload_size", "800K"),))
    save_users(h1.dir / "users.toml", users)
    r = cli("quota", "set", "carol", "--bytes", "1M", "--files", "3", config=h1.config)
    assert r.returncode == 0 and "1M" in r.stdout, r.stderr
    (h2.dir / "users.toml").write_text((h1.dir / "users.toml").read_text())  # the same users and homes everywhere
    h2.home = h1.home
    h1.start(nodes=2, wait=False)
    h2.start(nodes=1)
    wait_port(h1.host, h1.port, proc=h1.proc, log=h1.log)
    (h1.home / "big.bin").write_bytes(os.urandom(MiB // 2) * 5)
    (h1.home / "one.bin").write_bytes(os.urandom(MiB))
    (homes / "bob" / "huge.bin").write_bytes(b"\0" * (HUGE))
    (homes / "dave" / "small.bin").write_bytes(os.urandom(8192))
    yield mcs, h1, h2, homes, time.monotonic()
    for h in (h1, h2):
        h.stop(signal.SIGINT)
    for m in mcs:
        m.stop()


def login(srv: Server, user: str = "alice") -> ftplib.FTP:
    f = ftplib.FTP(timeout=20)
    f.connect(srv.host, srv.port)
    f.login(user, PASSWORD)
    return f


def download(srv: Server, path: str, nbytes: int, user: str = "alice", rest: int = 0) -> int:
    """RETR a file of `nbytes` bytes; bytes received."""
    f = login(srv, user)
    got = 0
    try:
        f.voidcmd("TYPE I")
        conn = f.transfercmd(f"RETR {path}", rest or None)
        with conn:
            while got < nbytes:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
        if got >= nbytes:
            f.voidresp()
    finally:
        f.close()
    return got


def upload(srv: Server, name: str, data: bytes, user: str = "carol", allo: int | None = None, cmd: str = "STOR",
           rest: int | None = None) -> str:  # fmt: skip
    """Upload; the final reply's code ("226", "552", ...)."""
    f = login(srv, user)
    try:
        f.voidcmd("TYPE I")
        if allo is not None:
            f.sendcmd(f"ALLO {allo}")
        try:
            conn = f.transfercmd(f"{cmd} {name}", rest)
        except ftplib.error_perm as e:
            return str(e)[:3]
        try:
            with conn:
                conn.sendall(data)
        except OSError:
            pass
        try:
            return f.voidresp()[:3]
        except ftplib.Error as e:
            return str(e)[:3]
    finally:
        f.close()


def timed(work) -> tuple[float, list]:
    out: list = []
    threads = [threading.Thread(target=lambda w=w: out.append(w())) for w in work]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return time.monotonic() - t0, out


def quota_json(srv: Server, user: str = "carol") -> dict:
    r = cli("quota", "show", user, "--json", config=srv.config)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def no_partial_files(home: Path) -> list[str]:
    return [p.name for p in home.iterdir() if p.name.startswith(".ftpcluster-upload.")]


# ---------------------------------------------------------------- rates
def test_one_session_download_holds_the_rate(cluster):
    _, h1, _, homes, _ = cluster
    elapsed, (got,) = timed([lambda: download(h1, "big.bin", int(2.5 * MiB))])
    assert got >= int(2.5 * MiB)
    rate = got / elapsed
    print(f"one session: {rate / RATE:.3f} x the limit in {elapsed:.2f} s")
    assert rate <= 1.10 * RATE
    assert rate >= 0.5 * RATE  # throttled, not stalled


def test_three_sessions_on_two_hosts_share_the_rate_unthrottled_user_keeps_speed(cluster):
    _, h1, h2, homes, _ = cluster
    alone_t, (alone,) = timed([lambda: download(h1, "huge.bin", HUGE, user="bob")])
    per = MiB
    work = [lambda: download(h1, "one.bin", per), lambda: download(h1, "big.bin", per, rest=int(1.5 * MiB)),
            lambda: download(h2, "one.bin", per)]  # fmt: skip
    bob: list[float] = []

    def bob_during() -> int:
        time.sleep(0.5)
        t0 = time.monotonic()
        n = download(h2, "huge.bin", HUGE, user="bob")
        bob.append(n / (time.monotonic() - t0))
        return 0

    elapsed, got = timed([*work, bob_during])
    total = sum(got)
    rate = total / elapsed
    print(f"three sessions: {rate / RATE:.3f} x the limit in {elapsed:.2f} s; bob {bob[0] / MiB:.0f} MiB/s during, "
          f"{alone / alone_t / MiB:.0f} MiB/s alone")  # fmt: skip
    assert total == 3 * per
    assert rate <= 1.10 * RATE
    assert bob and bob[0] > 10 * RATE and bob[0] > 0.3 * alone / alone_t


def test_upload_holds_the_rate(cluster):
    _, h1, h2, homes, _ = cluster
    data = os.urandom(2 * MiB)
    elapsed, (code,) = timed([lambda: upload(h2, "up.bin", data, user="alice")])
    assert code == "226"
    rate = len(data) / elapsed
    print(f"upload: {rate / RATE:.3f} x the limit in {elapsed:.2f} s")
    assert rate <= 1.10 * RATE
    assert (h1.home / "up.bin").stat().st_size == len(data)


def test_tls_download_holds_the_rate(cluster):
    _, h1, _, _, _ = cluster
    from .test_ftps import tls_login

    f = tls_login(h1)
    out = io.BytesIO()
    t0 = time.monotonic()
    f.retrbinary("RETR big.bin", out.write, rest=MiB // 2)  # 2 MiB: at most rate x (2 s + one 0.1 s slot)
    elapsed = time.monotonic() - t0
    f.quit()
    assert out.getvalue() == (h1.home / "big.bin").read_bytes()[MiB // 2 :]
    print(f"TLS: {2 * MiB / elapsed / RATE:.3f} x the limit in {elapsed:.2f} s")
    assert 2 * MiB / elapsed <= 1.10 * RATE


def test_session_rate_slower_than_data_timeout_is_not_cut(cluster):
    """2 KiB/s: after the first 4 KiB the next piece waits 2 s, longer than the data_timeout of 1.5 s."""
    _, h1, _, homes, _ = cluster
    f = login(h1, "dave")
    out = io.BytesIO()
    t0 = time.monotonic()
    f.retrbinary("RETR small.bin", out.write)
    elapsed = time.monotonic() - t0
    f.quit()
    assert out.getvalue() == (homes / "dave" / "small.bin").read_bytes()
    assert elapsed >= 1.5  # it was throttled


# ---------------------------------------------------------------- quotas
def site_used(srv: Server, user: str = "carol") -> tuple[int, int]:
    """(used bytes, used files) as SITE QUOTA tells a client of `srv`."""
    f = login(srv, user)
    try:
        text = wait_for(lambda: (lambda r: r if "Used bytes" in r else "")(f.sendcmd("SITE QUOTA")), timeout=5)
    finally:
        f.close()
    b = int(text.split("Used bytes: ")[1].split()[0])
    n = int(text.split("Used files: ")[1].split()[0])
    return b, n


def test_quota_refusals_leave_usage_right_and_no_partial_file(cluster):
    _, h1, h2, homes, _ = cluster
    home = homes / "carol"
    assert upload(h1, "a.bin", b"a" * 600_000) == "226"  # a quota alone keeps the threaded splice path
    assert (home / "a.bin").read_bytes() == b"a" * 600_000
    # The other host sees the upload (memcached counters), to the operator and to the client.
    q = quota_json(h2)
    assert (q["used_bytes"], q["used_files"], q["limit_bytes"], q["limit_files"]) == (600_000, 1, MiB, 3), q
    assert wait_for(lambda: site_used(h2) == (600_000, 1), timeout=5), site_used(h2)
    # Size known (ALLO): 552 before the data connection is used; nothing written.
    assert upload(h2, "b.bin", b"b" * 500_000, allo=500_000) == "552"
    assert not (home / "b.bin").exists()
    # Size unknown: cut when the quota is crossed; no partial file, the usage unchanged.
    assert upload(h2, "c.bin", b"c" * 600_000) == "552"
    # APPE past max_upload_size (800K): cut back to the size it had.
    assert upload(h1, "a.bin", b"d" * 600_000, cmd="APPE") == "552"
    assert not (home / "c.bin").exists() and (home / "a.bin").stat().st_size == 600_000
    assert not no_partial_files(home)
    assert wait_for(lambda: site_used(h1) == (600_000, 1) and site_used(h2) == (600_000, 1), timeout=5)
    # max_upload_size (800K): refused before the first byte when ALLO tells the size.
    assert upload(h1, "e.bin", b"e" * 10, allo=900_000) == "552"
    # A file limit of 3: the fourth file is refused; DELE gives the room back.
    for n in ("f1", "f2"):
        assert upload(h1, n, b"x" * 1000) == "226"
    assert wait_for(lambda: site_used(h2) == (602_000, 3), timeout=5)
    assert upload(h2, "f3", b"x" * 1000) == "552"
    f = login(h2, "carol")
    f.delete("a.bin")
    f.quit()
    assert wait_for(lambda: site_used(h1) == (2000, 2), timeout=5), site_used(h1)
    r = cli("quota", "rescan", "carol", config=h2.config)
    assert r.returncode == 0 and "2000 bytes in 2 files" in r.stdout, r.stdout + r.stderr


def test_forged_usage_record_is_ignored_and_repaired(cluster):
    mcs, h1, h2, _, _ = cluster
    value = b'{"b":0,"f":0}'  # no MAC: written by something without the cluster key
    assert mcs[0].command(f"set ftpcluster:v1:quota:carol 0 0 {len(value)}\r\n".encode().decode() + value.decode()).startswith(b"STORED")
    q = quota_json(h1)
    assert (q["source"], q["used_bytes"], q["used_files"]) == ("scan", 2000, 2)
    assert site_used(h2) == (2000, 2)  # the node rescans and writes a record of its own
    assert wait_for(lambda: quota_json(h1)["source"] == "memcache", timeout=5)


def disk_usage(home: Path) -> tuple[int, int]:
    """(bytes, files) as a scan counts them: regular files, temporary uploads left out."""
    files = [p for p in home.rglob("*") if p.is_file() and not p.is_symlink() and not p.name.startswith(".ftpcluster-upload.")]
    return sum(p.stat().st_size for p in files), len(files)


def test_usage_stays_exact_when_scanned_during_an_upload(cluster):
    """A scan skips the temporary files of uploads in flight; their reservations must
    survive it, whether the record was gone (usage not known: the node scans) or
    `quota rescan` replaced it. QA saw 580,986 bytes counted for 700,000 on disk.
    f1 is overwritten (so the file count stays below the limit of 3), then put back."""
    mcs, h1, h2, homes, _ = cluster
    home = homes / "carol"
    base = disk_usage(home)
    scans = ((h1, h2, lambda: mcs[0].command("delete ftpcluster:v1:quota:carol").startswith(b"DELETED")),
             (h2, h1, lambda: cli("quota", "rescan", "carol", config=h1.config).returncode == 0))  # fmt: skip
    for srv, other, scan in scans:
        f = login(srv, "carol")
        f.voidcmd("TYPE I")
        with f.transfercmd("STOR f1") as conn:
            conn.sendall(b"m" * 300_000)
            sent, stop = [300_000], threading.Event()

            def trickle() -> None:  # the pause must not reach data_timeout (1.5 s)
                while not stop.wait(0.1):
                    conn.sendall(b"m")
                    sent[0] += 1

            keep = threading.Thread(target=trickle)
            keep.start()
            try:  # reserved as it arrives (64 KiB steps): the other host sees it
                grew = wait_for(lambda: quota_json(other)["used_bytes"] >= base[0] + 200_000, timeout=10)
                scanned = grew and scan()
            finally:
                stop.set()
                keep.join(5)
            assert grew and scanned, quota_json(other)
            conn.sendall(b"m" * 300_000)
        assert f.voidresp()[:3] == "226"
        f.quit()
        want = (base[0] - 1000 + sent[0] + 300_000, base[1])
        assert disk_usage(home) == want
        assert wait_for(lambda: (lambda q: (q["used_bytes"], q["used_files"]))(quota_json(h1)) == want, timeout=10), quota_json(h1)
        assert wait_for(lambda: site_used(h1) == want and site_used(h2) == want, timeout=10), (site_used(h1), site_used(h2))
        assert upload(other, "f1", b"x" * 1000) == "226"
        assert wait_for(lambda: site_used(h1) == base and site_used(h2) == base, timeout=10), site_used(h1)


def test_max_upload_size_cuts_during_upload(cluster):
    _, h1, _, homes, _ = cluster
    home = homes / "bob"  # no quota, a maximum upload size
    assert upload(h1, "big.up", b"z" * 900_000, user="bob") == "552"
    assert not (home / "big.up").exists() and not no_partial_files(home)
    assert upload(h1, "ok.up", b"z" * 700_000, user="bob") == "226"
    # REST n STOR past the limit: the file keeps its size (its first n bytes untouched).
    assert upload(h1, "ok.up", b"n" * 600_000, user="bob", rest=300_000) == "552"
    got = (home / "ok.up").read_bytes()
    assert len(got) == 700_000 and got[:300_000] == b"z" * 300_000, len(got)
    # REST n STOR within it: the first n bytes, then the new data, and nothing after.
    assert upload(h1, "ok.up", b"n" * 50_000, user="bob", rest=100_000) == "226"
    assert (home / "ok.up").read_bytes() == b"z" * 100_000 + b"n" * 50_000


def test_status_json_and_metrics_show_limits(cluster):
    """status shows the limits; h1's metrics count what this test does (deltas from a
    reading taken first, so earlier tests cannot satisfy them)."""
    _, h1, _, homes, _ = cluster
    st = json.loads(cli("status", "--json", config=h1.config).stdout)
    assert st["limits"]["user_download_rate"] == RATE and st["limits"]["classes"]["free"]["user_download_rate"] == 0
    from ftpcluster.supervisor.status_view import render_status

    assert "limits      user down 1M/s, user up 1M/s, classes free, trickle" in render_status(st)
    from .test_observability import scrape

    port = int(h1.config.read_text().split('listen = "127.0.0.1:')[-1].split('"')[0])
    out = (("direction", "out"),)
    before_refusal = (("limit", "max_upload_size"), ("when", "before"))
    during_refusal = (("limit", "max_upload_size"), ("when", "during"))
    m0 = scrape(port)
    assert download(h1, "one.bin", MiB) == MiB  # alice: throttled at 1 MiB/s
    assert upload(h1, "m.up", b"z" * 10, user="bob", allo=900_000) == "552"  # refused before
    assert upload(h1, "m.up", b"z" * 900_000, user="bob") == "552"  # cut during
    assert not (homes / "bob" / "m.up").exists()
    m = scrape(port)

    def delta(name: str, labels: tuple) -> float:
        return m.get((name, labels), 0) - m0.get((name, labels), 0)

    assert delta("ftpcluster_throttled_bytes_total", out) >= MiB // 2
    assert delta("ftpcluster_throttle_waits_total", out) > 0
    assert delta("ftpcluster_quota_refusals_total", before_refusal) == 1
    assert delta("ftpcluster_quota_refusals_total", during_refusal) == 1


# ---------------------------------------------------------------- memcached hung, then down (last: it kills memcached)
def test_hung_memcached_falls_back_to_the_host_share_without_stalling(cluster):
    """memcached SIGSTOPped: a rate lease is not waited on past its deadline (the node's
    memcached thread drops it), the host's share applies; the same download on the same
    host takes at most a few times what it took with memcached answering."""
    mcs, _, h2, _, _ = cluster
    healthy_t, (got,) = timed([lambda: download(h2, "one.bin", MiB)])
    assert got == MiB
    mcs[0].proc.send_signal(signal.SIGSTOP)
    try:
        hung_t, (got,) = timed([lambda: download(h2, "one.bin", MiB)])
    finally:
        mcs[0].proc.send_signal(signal.SIGCONT)
    print(f"memcached hung: {hung_t:.2f} s against {healthy_t:.2f} s answering")
    assert got == MiB
    # The host's share is half the cluster rate (two hosts seen): about twice as long,
    # plus the first leases' deadlines before the server is seen down (seen: 2.4x).
    assert hung_t <= 5 * healthy_t, (hung_t, healthy_t)


def test_memcached_down_falls_back_to_host_shares(cluster):
    """Each host then takes half the rate (2 hosts seen), its nodes sharing it: h1's
    two sessions (2 nodes) together, h2's one session, all at the same time."""
    mcs, h1, h2, _, started = cluster
    hosts = lambda: len(json.loads(cli("status", "--json", config=h2.config).stdout).get("cluster", {}).get("hosts", []))  # noqa: E731
    assert wait_for(lambda: hosts() == 2, timeout=15)
    time.sleep(max(0.0, started + 10 - time.monotonic()))  # hosts publish every 5 s, nodes read them every 2 s
    for m in mcs:
        m.stop()
    half = MiB // 2

    def timed_one(work):  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        n = work()
        return n, time.monotonic() - t0

    _, got = timed([lambda: timed_one(lambda: download(h1, "big.bin", half, rest=2 * MiB)),
                    lambda: timed_one(lambda: download(h1, "big.bin", half, rest=2 * MiB)),
                    lambda: timed_one(lambda: download(h2, "one.bin", MiB))])  # fmt: skip
    by_size = sorted(got)
    h1_total, h1_time = by_size[0][0] + by_size[1][0], max(by_size[0][1], by_size[1][1])
    h2_total, h2_time = by_size[2]
    print(f"memcached down: h1 {h1_total / h1_time / RATE:.3f}, h2 {h2_total / h2_time / RATE:.3f} x the limit "
          f"(host share 0.5) in {h1_time:.2f} / {h2_time:.2f} s")  # fmt: skip
    assert (h1_total, h2_total) == (MiB, MiB)
    # A host's budget comes in 100 ms slots and a transfer may start with a slot's whole
    # share and end inside another: up to two slots more than share x elapsed, which on
    # a ~2 s transfer is ~10 % (seen: 0.554 x in 1.81 s). The 10 % bound holds on that.
    slots = 2 * 0.1
    assert h1_total / (h1_time + slots) <= 0.55 * RATE and h2_total / (h2_time + slots) <= 0.55 * RATE
    before = quota_json(h1)  # memcached down: counted from the disk
    assert before["source"] == "scan"
    assert upload(h1, "g.bin", b"g" * 1000) == "226"
    want = (before["used_bytes"] + 1000, before["used_files"] + 1)
    assert wait_for(lambda: site_used(h1) == want and site_used(h2) == want, timeout=5), site_used(h1)


def test_host_leases_share_one_budget_between_nodes(tmp_path):
    """Two tables on one file stand for two nodes of a host: one budget per slot."""
    from ftpcluster.cluster.host_lease import HostLeases

    a, b = HostLeases(tmp_path / "rates.shm"), HostLeases(tmp_path / "rates.shm")
    got = [t.take("out:alice", 7, 100_000, 30_000) for t in (a, b, a, b, a)]
    assert got == [30_000, 30_000, 30_000, 10_000, 0]
    assert a.take("out:alice", 8, 100_000, 30_000) == 30_000  # the next slot starts afresh
    assert b.take("out:bob", 8, 100_000, 30_000) == 30_000  # another key


def test_limits_resolve_most_specific_first_and_bad_values_are_named():
    from ftpcluster.config import ConfigError, from_dict
    from ftpcluster.limits import limits_for, user_problems
    from ftpcluster.users import UserRecord

    cfg = from_dict({"limits": {"user_download_rate": "1M", "max_upload_size": 2048,
                                "classes": {"gold": {"user_download_rate": "0", "quota_bytes": "5G"}}}})  # fmt: skip
    gold = UserRecord("g", "$argon2id$x", "/h", user_class="gold", limits=(("quota_files", 7),))
    lim = limits_for(cfg, gold)
    assert (lim.download_rate, lim.quota_bytes, lim.quota_files, lim.max_upload_size) == (0, 5 << 30, 7, 2048)
    assert limits_for(cfg, None).download_rate == 1 << 20
    bad = UserRecord("b", "$argon2id$x", "/h", user_class="silver", limits=(("upload_rate", "fast"),))
    assert user_problems(cfg, {"b": bad}) == [
        "[server] users_file: user b: no class 'silver' in [limits] classes",
        "[server] users_file: user b: upload_rate: not a size: 'fast' (use 512K, 1M, 2G or a number of bytes; \"0\" = no limit)",
    ]
    with pytest.raises(ConfigError, match="limits.classes.gold.user_upload_rate"):
        from_dict({"limits": {"classes": {"gold": {"user_upload_rate": "-1"}}}})
