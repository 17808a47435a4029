"""memcached that hangs or vanishes and comes back, with two real hosts (one node
each) sharing two real memcached servers: FTPS with session tickets off, so a
cross-host resumption needs memcached, and a ban rule counted cluster-wide.

- Both servers SIGSTOPped: plain logins on the node that runs the FTPS
  handshakes are as fast as before (medians in the same run), the handshakes
  fall back to full ones within the deadline, status shows the servers down
  within 5 s.
- Both servers killed, then started again on the same ports: cross-host TLS
  resumption and cluster-wide ban counting come back without a reload.

The hosts are shared by the tests of this module (in this order)."""

from __future__ import annotations

import ftplib
import signal
import socket
import ssl
import statistics
import threading
import time
from typing import Any

import pytest

from .support_cluster import status
from .support_memcached import Memcached, have_memcached, start_memcached
from .support_server import Server, cli, make_server, wait_for
from .test_bans import greet, login
from .test_ftps import client_ctx

pytestmark = pytest.mark.slow  # memcached faults: `make test` runs it, -m "not slow" leaves it out

TIMEOUT = 0.2  # [memcache] timeout: the prefetch deadline too
RULE = {"event": "MaxLoginAttempts", "threshold": 3, "window": "1m", "duration": "1h"}
LOGINS = 25
CTX = client_ctx(ssl.TLSVersion.TLSv1_2)  # a session resumes only through the context that made it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not have_memcached():
        pytest.skip("memcached is not installed")
    tmp = tmp_path_factory.mktemp("mcfaults")
    mcs = start_memcached(2)
    key = tmp / "session.key"
    assert cli("key", "generate", "--out", str(key)).returncode == 0
    tls = {"session_cache": "memcache", "session_tickets": "off", "session_key_file": str(key)}
    mc = {"enabled": True, "servers": [m.address for m in mcs], "replicas": 2, "timeout": f"{int(TIMEOUT * 1000)}ms",
          "connect_failures": 2, "probe_interval": "300ms"}  # fmt: skip
    hosts: list[Server] = []
    try:
        for name in ("m1", "m2"):
            h = make_server(tmp / name, implicit=True, tls=dict(tls), memcache=dict(mc),
                            server={"max_login_attempts": 1}, ban={"rules": [RULE]})  # fmt: skip
            if hosts:  # one certificate for the cluster
                for f in ("cert.pem", "key.pem"):
                    (h.dir / "certs" / f).write_bytes((hosts[0].dir / "certs" / f).read_bytes())
            hosts.append(h)
        for h in hosts:
            h.start(nodes=1)
        yield mcs, hosts
    finally:
        for m in mcs:  # never leave a stopped memcached behind
            _cont(m)
            m.stop()
        for h in hosts:
            h.stop(signal.SIGINT)


def _cont(m: Memcached) -> None:
    if m.proc is not None and m.proc.poll() is None:
        m.proc.send_signal(signal.SIGCONT)


def _ftps_once(h: Server, session: Any) -> tuple[float, bool, Any]:
    """One implicit-TLS session offering `session`: (handshake seconds, resumed, new session)."""
    with socket.create_connection((h.host, h.implicit_port), timeout=10) as raw:
        t0 = time.monotonic()
        with CTX.wrap_socket(raw, session=session) as s:
            took = time.monotonic() - t0
            f = s.makefile("rwb")
            assert f.readline().startswith(b"220")
            f.write(b"QUIT\r\n")
            f.flush()
            f.readline()
            return took, s.session_reused, s.session


class FtpsChurn(threading.Thread):
    """Pairs of FTPS sessions: a new session on one host, then the other host asked
    to resume it (which needs memcached); the hosts swap roles every pair."""

    def __init__(self, hosts: list[Server]) -> None:
        super().__init__(daemon=True)
        self.hosts = hosts
        self.stop = threading.Event()
        self.results: list[tuple[float, float, bool]] = []  # cross-host tries: (start, handshake seconds, resumed)
        self.errors: list[str] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set() and i < 1000:
            try:
                _, _, session = _ftps_once(self.hosts[i % 2], None)
                time.sleep(0.03)  # the new session reaches memcached from a background thread
                start = time.monotonic()
                took, reused, _ = _ftps_once(self.hosts[(i + 1) % 2], session)
                self.results.append((start, took, reused))
            except (OSError, ssl.SSLError, AssertionError) as e:
                self.errors.append(repr(e))
            i += 1
            time.sleep(0.01)


def _login_times(h: Server, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        f = ftplib.FTP(timeout=10)
        f.connect(h.host, h.port)
        f.login(h.user, h.password)
        f.quit()
        out.append(time.monotonic() - t0)
        time.sleep(0.02)
    return out


def _servers_up(h: Server) -> list[bool]:
    return [s["up"] for s in status(h)["memcache"]["servers"]]


def test_hung_memcached_stalls_no_loop_and_shows_down(cluster):
    mcs, (a, b) = cluster
    assert wait_for(lambda: all(_servers_up(a)), timeout=10)
    churn = FtpsChurn([a, b])
    churn.start()
    try:
        _login_times(a, 2)  # the password check cached on the node
        time.sleep(0.3)  # resumptions flowing
        healthy = _login_times(a, LOGINS)
        split = time.monotonic()
        for m in mcs:
            m.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        hung = _login_times(a, LOGINS)
        # status: down within 5 s of the SIGSTOP, with the reason and since when
        down = wait_for(lambda: (lambda st: st if not any(s["up"] for s in st) else None)(
            status(a)["memcache"]["servers"]), timeout=max(0.1, 5 - (time.monotonic() - stopped_at)))  # fmt: skip
        shown_down = time.monotonic() - stopped_at
        assert down and shown_down < 5, down
        assert all(s["last_error"] and s["ejected_since"] for s in down), down
        time.sleep(0.5)
    finally:
        churn.stop.set()
        resumed_at = time.monotonic()
        for m in mcs:
            _cont(m)
        churn.join(15)
    before = [r for r in churn.results if r[0] < split]
    # Handshakes done while memcached was stopped: one still running at the SIGCONT may
    # find memcached answering again (seen once in a clean-clone run: 1 of 13 resumed).
    after = [r for r in churn.results if r[0] >= stopped_at and r[0] + r[1] < resumed_at]
    print(f"\nlogin ms healthy p50 {statistics.median(healthy) * 1000:.2f} max {max(healthy) * 1000:.1f}; "
          f"hung p50 {statistics.median(hung) * 1000:.2f} max {max(hung) * 1000:.1f}; "
          f"cross-host handshakes hung: {len(after)}, max {max((r[1] for r in after), default=0) * 1000:.1f} ms, "
          f"resumed {sum(r[2] for r in after)}; status down after {shown_down:.2f} s")
    assert before and any(r[2] for r in before), (before, churn.errors)  # cross-host resumption worked
    assert after, churn.errors
    # Hung: every handshake is a full one, done within the deadline (plus slack for the machine).
    assert not any(r[2] for r in after), [(round(r[0] - stopped_at, 3), round(r[1], 3), r[2]) for r in after]
    assert max(r[1] for r in after) < TIMEOUT + 0.8, sorted(r[1] for r in after)[-5:]
    mh, mu = statistics.median(healthy), statistics.median(hung)
    why = f"login healthy p50 {mh * 1000:.1f} max {max(healthy) * 1000:.1f} ms, hung p50 {mu * 1000:.1f} max {max(hung) * 1000:.1f} ms"
    assert mu - mh < 0.015, why
    # A loop blocked on memcached holds a login for the timeout of each server (400 ms here).
    assert max(hung) - max(healthy) < 0.15, why
    assert wait_for(lambda: all(_servers_up(a)), timeout=10)  # and back once they run again


def _resumes_across(a: Server, b: Server) -> bool:
    _, _, sess = _ftps_once(a, None)
    time.sleep(0.3)  # the new session reaches memcached from the node's memcached thread
    _, reused, _ = _ftps_once(b, sess)
    return reused


def test_all_memcached_killed_and_restarted_cluster_heals(cluster):
    mcs, (a, b) = cluster
    assert wait_for(lambda: all(_servers_up(a)) and all(_servers_up(b)), timeout=10)
    ports = [m.port for m in mcs]
    for m in mcs:
        m.stop()
    # Traffic during the outage, so every ring finds the servers gone.
    for i in range(2):
        for h in (a, b):
            _ftps_once(h, None)
            with pytest.raises(ftplib.error_perm):
                login(h, f"127.0.3.{100 + i}", password="wrong")
    assert wait_for(lambda: not any(_servers_up(a)), timeout=5)
    for m, port in zip(mcs, ports):
        m.port = port
        m.start()  # same ports, empty servers
    assert wait_for(lambda: all(_servers_up(a)) and all(_servers_up(b)), timeout=10)
    back = time.monotonic()
    assert wait_for(lambda: _resumes_across(a, b) and _resumes_across(b, a), timeout=15), "no cross-host resumption"
    print(f"\ncross-host resumption back {time.monotonic() - back:.2f} s after the servers answered")
    # Cluster-wide counting: two failures on a and one on b reach a threshold of 3.
    for attempt in range(3):
        ip = f"127.0.3.{10 + attempt}"
        for h in (a, a, b):
            with pytest.raises(ftplib.error_perm):
                login(h, ip, password="wrong")
            time.sleep(0.1)
        if wait_for(lambda: greet(b, ip).startswith(b"530"), timeout=4):
            break
    else:
        pytest.fail("cluster ban counting did not come back")
    print(f"cluster ban counting back at attempt {attempt + 1}")
    assert wait_for(lambda: greet(a, ip).startswith(b"530"), timeout=5)
