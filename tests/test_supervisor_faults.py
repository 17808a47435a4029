"""The supervisor never falls over: out of descriptors on its control socket and
metrics endpoint (RLIMIT_NOFILE=128, 200 connections each), and a reload whose
ban tables cannot be opened. Every node stays the same process throughout."""

from __future__ import annotations

import errno
import ftplib
import resource
import select
import socket
import time

import pytest

from .support_cluster import alive, node_pids, ready_status
from .support_server import cli, free_port, make_server, wait_for

pytestmark = pytest.mark.slow  # supervisor faults: `make test` runs it, -m "not slow" leaves it out

CONNECTIONS = 200


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


def _open_many(family: int, address: object, request: bytes) -> tuple[list[socket.socket], list[socket.socket]]:
    """CONNECTIONS non-blocking connects (a full backlog is retried for up to 1 s);
    every other connection sends `request`, the rest stay idle. Returns (all, senders)."""
    pending = [socket.socket(family, socket.SOCK_STREAM) for _ in range(CONNECTIONS)]
    for s in pending:
        s.setblocking(False)
    done: list[socket.socket] = []
    deadline = time.monotonic() + 1.0
    while pending and time.monotonic() < deadline:
        retry = []
        for s in pending:
            code = s.connect_ex(address)
            if code in (0, errno.EISCONN, errno.EINPROGRESS):
                done.append(s)
            elif code in (errno.EAGAIN, errno.EALREADY):  # unix backlog full
                retry.append(s)
            else:
                s.close()
        pending = retry
        if pending:
            time.sleep(0.05)
    for s in pending:
        s.close()
    _, writable, _ = select.select([], done, [], 2.0) if done else ([], [], [])
    senders = []
    for i, s in enumerate(writable):
        if i % 2 == 0:
            try:
                s.send(request)
                senders.append(s)
            except OSError:
                pass
    return done, senders


def _replies(socks: list[socket.socket], deadline: float) -> int:
    got = 0
    for s in socks:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if s.recv(4096):
                got += 1
        except OSError:
            pass
    return got


def test_supervisor_survives_fd_exhaustion_and_a_failed_reload(tmp_path) -> None:
    mport = free_port()
    srv = make_server(tmp_path, metrics={"listen": f"127.0.0.1:{mport}"})
    srv.start(nodes=2, preexec_fn=_limit_fds)
    try:
        ready_status(srv, 2)
        before = node_pids(srv)
        assert len(before) == 2

        state = srv.dir / "state"
        held, asked = _open_many(socket.AF_UNIX, str(state / "control.sock"), b'{"cmd": "ping"}\n')
        mheld, masked = _open_many(socket.AF_INET, ("127.0.0.1", mport), b"GET /metrics HTTP/1.0\r\n\r\n")
        assert len(held) + len(mheld) > 128, "the connections never reached the descriptor limit"
        assert _replies(asked + masked, time.monotonic() + 1.5) > 0, "nothing answered while descriptors ran out"
        assert srv.proc.poll() is None, srv.logs()[-2000:]
        for s in held + mheld:
            s.close()

        r = cli("status", "--json", config=srv.config, timeout=20)
        assert r.returncode == 0, r.stderr + srv.logs()[-2000:]
        assert "accept failed, pausing this listener" in srv.logs(), "the test never hit EMFILE"
        assert node_pids(srv) == before and all(alive(p) for p in before.values())
        with srv.ftp() as f:
            f.voidcmd("NOOP")

        # A reload whose new ban table cannot be opened (the path is a directory):
        # refused with the reason, the running config, tables and nodes stay.
        (state / "bans2-4096.shm").mkdir()
        text = srv.config.read_text()
        assert "[ban]" not in text
        srv.config.write_text(text + "\n[ban]\ntable_size = 4096\n")
        r = cli("reload", config=srv.config, timeout=30)
        assert r.returncode == 1 and "reload failed" in r.stderr, (r.returncode, r.stderr)
        assert srv.proc.poll() is None
        assert cli("ban", "host", "127.0.0.77", config=srv.config).returncode == 0  # old tables still work
        assert node_pids(srv) == before
    finally:
        srv.stop()


def _limit_fds_96() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))


def test_node_with_few_descriptors_answers_421_instead_of_running_out(tmp_path) -> None:
    """A node whose descriptor limit is below what max_sessions_per_node needs admits
    only the sessions that fit and answers 421 to the rest: no connection is closed
    unanswered (the event loop's accept, out of descriptors, would close them), the
    node stays the same process, and it serves again once they are gone."""
    srv = make_server(tmp_path)
    srv.start(nodes=1, preexec_fn=_limit_fds_96)
    try:
        ready_status(srv, 1)
        before = node_pids(srv)
        held = [socket.create_connection((srv.host, srv.port), timeout=5) for _ in range(150)]
        firsts = []
        for s in held:
            s.settimeout(5)
            try:
                firsts.append(s.recv(100)[:3])
            except OSError:
                firsts.append(b"err")
        greeted, refused = firsts.count(b"220"), firsts.count(b"421")
        assert greeted + refused == len(held), sorted(set(firsts))
        assert 0 < greeted < len(held) and refused > 0
        assert "descriptor limit below what max_sessions_per_node needs" in srv.logs()
        for s in held:
            s.close()

        def served() -> bool:
            try:
                with srv.ftp() as f:
                    f.voidcmd("NOOP")
                return True
            except (OSError, EOFError, ftplib.Error):  # 421 until the node saw the closes
                return False

        assert wait_for(served, timeout=10), "not served again once the connections were gone"
        assert node_pids(srv) == before
    finally:
        srv.stop()
