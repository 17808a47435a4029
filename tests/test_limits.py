"""Limits and timeouts from [server]: login_timeout, idle_timeout, data_timeout,
max_login_attempts, max_sessions_per_node, max_line_length.

Durations are short ("1s"); the node sweeps timeouts about once a second, so
every wait here is bounded generously and no test asserts how long anything took."""

from __future__ import annotations

import os
import socket
import time
from typing import Callable


from .support_server import Server
from .support_server import wait_for
from .test_bad_input import Raw, node_pid

Factory = Callable[..., Server]


def closed_with_421(c: Raw, timeout: float = 10) -> bytes:
    """Wait (bounded) for the server's 421 and the close that follows; return the 421 text."""
    c.sock.settimeout(timeout)
    code, text = c.reply()
    assert code == 421, text
    assert c.closed_by_server(timeout)
    return text


def test_login_timeout(server_factory: Factory) -> None:
    srv = server_factory(server={"login_timeout": "1s"})
    pid = node_pid(srv)
    idle = Raw(srv)
    assert b"login timeout" in closed_with_421(idle).lower()
    # Commands do not extend the time to log in.
    busy = Raw(srv)
    deadline = time.monotonic() + 10
    got = None
    while time.monotonic() < deadline:
        busy.send(b"NOOP\r\n")
        code, text = busy.reply()
        if code == 421:
            got = text
            break
        assert code == 200
        time.sleep(0.2)
    assert got is not None and b"login timeout" in got.lower()
    assert busy.closed_by_server()
    # A logged-in session is not affected by the login timeout.
    ok = Raw(srv)
    ok.login()
    for _ in range(6):
        time.sleep(0.5)
        assert ok.cmd("NOOP") == 200
    ok.close()
    assert node_pid(srv) == pid


def test_idle_timeout(server_factory: Factory) -> None:
    srv = server_factory(server={"idle_timeout": "1s"})
    c = Raw(srv)
    c.login()
    assert b"idle timeout" in closed_with_421(c).lower()
    # Activity keeps a session alive.
    c = Raw(srv)
    c.login()
    for _ in range(8):
        time.sleep(0.4)
        assert c.cmd("NOOP") == 200
    c.close()
    # A byte now and then with no end of line is not activity (slowloris): still 421.
    c = Raw(srv)
    c.login()
    for _ in range(8):
        try:
            c.send(b"N")
        except OSError:  # closed already
            break
        time.sleep(0.4)
        if c.closed_by_server(timeout=0.01):
            break
    else:
        raise AssertionError("partial lines kept the session alive past idle_timeout")


def test_idle_timeout_does_not_end_a_running_transfer(server_factory: Factory) -> None:
    srv = server_factory(server={"idle_timeout": "1s", "data_timeout": "30s"})
    with open(srv.home / "big.bin", "wb") as fh:
        fh.truncate(32 * 1024 * 1024)
    c = Raw(srv)
    c.login()
    d = c.pasv()
    assert c.cmd("RETR big.bin") == 150
    d.settimeout(10)
    got = 0
    end = time.monotonic() + 3  # read slowly for longer than the idle timeout
    while time.monotonic() < end:
        got += len(d.recv(65536))
        time.sleep(0.1)
    while chunk := d.recv(1 << 20):
        got += len(chunk)
    d.close()
    assert got == 32 * 1024 * 1024
    assert c.reply()[0] == 226
    c.close()


def test_idle_clock_restarts_after_a_long_transfer(server_factory: Factory) -> None:
    """A session that just finished a transfer longer than idle_timeout is not idle."""
    srv = server_factory(server={"idle_timeout": "2s", "data_timeout": "30s"})
    with open(srv.home / "big.bin", "wb") as fh:
        fh.truncate(16 * 1024 * 1024)
    c = Raw(srv)
    c.login()
    d = c.pasv()
    assert c.cmd("RETR big.bin") == 150
    d.settimeout(10)
    end = time.monotonic() + 4
    while time.monotonic() < end:
        d.recv(65536)
        time.sleep(0.1)
    while d.recv(1 << 20):
        pass
    d.close()
    assert c.reply()[0] == 226
    time.sleep(1.5)  # less than the idle timeout after the transfer ended
    assert c.cmd("NOOP") == 200
    c.close()


def test_data_timeout(server_factory: Factory) -> None:
    srv = server_factory(server={"data_timeout": "1s"})
    (srv.home / "f.bin").write_bytes(b"x" * 1000)
    with open(srv.home / "big.bin", "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    c = Raw(srv)
    c.login()
    c.sock.settimeout(15)
    # Passive port opened, client never connects.
    assert c.reply_to("EPSV")[0] == 229
    assert c.cmd("RETR f.bin") == 150
    assert c.reply()[0] == 425
    # Connected, RETR, client stops reading.
    d = c.pasv()
    assert c.cmd("RETR big.bin") == 150
    d.recv(1000)
    code, text = c.reply()
    assert code == 426, text
    d.close()
    # Connected, STOR, client sends nothing.
    d = c.pasv()
    assert c.cmd("STOR up.bin") == 150
    d.sendall(b"partial")
    assert c.reply()[0] == 426
    d.close()
    assert wait_for(lambda: not os.path.exists(srv.home / "up.bin") and not [
        n for n in os.listdir(srv.home) if n.startswith(".ftpcluster-upload.")], 5)
    # Active mode: the server connects to us, we accept and then send nothing.
    with socket.create_server(("127.0.0.1", 0), backlog=1) as ls:
        port = ls.getsockname()[1]
        assert c.cmd(f"EPRT |1|127.0.0.1|{port}|") == 200
        assert c.cmd("STOR up2.bin") == 150
        conn, _ = ls.accept()  # accept, then send nothing
        assert c.reply()[0] == 426
        conn.close()
    assert c.cmd("NOOP") == 200  # the session survives all of it
    c.close()


def test_max_login_attempts(server_factory: Factory) -> None:
    srv = server_factory(server={"max_login_attempts": 3})
    c = Raw(srv)
    # Fewer failures than the limit, then success.
    for _ in range(2):
        assert c.cmd("USER alice") == 331
        assert c.cmd("PASS wrong") == 530
    c.login()
    c.close()
    c = Raw(srv)
    for i in range(3):
        assert c.cmd("USER alice") == 331
        code, text = c.reply_to("PASS wrong")
        assert code == 530, text
    assert c.closed_by_server()
    # One session hitting the limit does not lock the account or the address (the
    # default ban rule needs two such sessions).
    c = Raw(srv)
    c.login()
    c.close()


def test_max_sessions_per_node(server_factory: Factory) -> None:
    srv = server_factory(server={"max_sessions_per_node": 3})

    def admitted() -> bool:
        r = Raw(srv)
        ok = r.greeting[0] == 220
        r.close()
        return ok

    # The start-up probe (wait_port) is a session until the node has read its close.
    def greeted() -> Raw | None:
        r = Raw(srv)
        if r.greeting[0] == 220:
            return r
        r.close()
        return None

    sessions: list[Raw] = []
    for _ in range(3):
        s = wait_for(greeted, 10, 0.1)
        assert s, "a free slot was refused"
        sessions.append(s)
    extra = Raw(srv)
    assert extra.greeting[0] == 421
    assert extra.closed_by_server()
    sessions[0].cmd("QUIT")
    sessions[0].close()
    assert wait_for(admitted, 10, 0.2)
    sessions[1].login()
    assert sessions[1].cmd("NOOP") == 200
    for s in sessions[1:]:
        s.close()


def test_full_node_leaves_connections_to_a_node_with_room(server_factory: Factory) -> None:
    """Two nodes share the listener. One with max_sessions_per_node sessions stops
    listening while the other has room, so the next client is served by the other,
    not told 421 (here the other node is stopped for a moment, so the first one
    takes both sessions and the third client waits for the other in the queue).
    With no node left with room, a client is told 421 again (within a second)."""
    import signal

    from .support_cluster import node_pids

    srv = server_factory(nodes=2, server={"max_sessions_per_node": 2})
    assert wait_for(lambda: len(node_pids(srv)) == 2, 10, 0.1)
    pids = sorted(node_pids(srv).values())
    time.sleep(1.2)  # both heartbeats written since they started accepting
    os.kill(pids[1], signal.SIGSTOP)  # its heartbeat stays fresh for a few seconds
    sessions: list[Raw] = []
    try:
        for _ in range(2):
            sessions.append(Raw(srv))
            assert sessions[-1].greeting[0] == 220
        waiting = socket.create_connection((srv.host, srv.port), timeout=10)
        waiting.settimeout(0.5)
        try:
            early = waiting.recv(100)  # the full node would answer 421 at once
        except socket.timeout:
            early = b""
        assert early == b"", early
    finally:
        os.kill(pids[1], signal.SIGCONT)
    waiting.settimeout(10)
    assert waiting.recv(100).startswith(b"220"), "the node with room did not take the waiting client"
    sessions.append(Raw(srv))  # the fourth session: both nodes are full now
    assert sessions[-1].greeting[0] == 220
    time.sleep(1.5)  # no node has room: the first one listens again within a second
    over = Raw(srv)
    assert over.greeting[0] == 421  # no node has room: told at once, as before
    over.close()
    # A node full while no other had room keeps listening; once one has room again
    # (the fourth session, on the second node, ends) it leaves the queue to it.
    sessions.pop().close()
    time.sleep(1.5)  # the full node looks again within a second
    greetings = []
    for _ in range(6):
        r = Raw(srv)
        greetings.append(r.greeting[0])
        r.close()
        time.sleep(0.1)  # its session ended on the node (the slot is free again)
    assert greetings == [220] * 6
    for r in sessions:
        r.close()
    waiting.close()


def test_full_node_counts_handshakes_and_leaves_the_rest_of_the_queue(server_factory: Factory) -> None:
    """With implicit TLS a node accepts in batches from the queue (its own accept
    loop): once full it leaves the rest of the batch in the queue for a node with
    room, not 421s. Connections still in their handshake count against the cap in
    the node table too: two nodes full of them do not each take the other for one
    with room (then both would stop listening and clients wait in the queue until
    the handshakes time out, not 421)."""
    import signal
    import ssl

    from .support_cluster import node_pids

    srv = server_factory(nodes=2, tls={"handshake_timeout": "60s"}, implicit=True, server={"max_sessions_per_node": 2})
    assert srv.implicit_port is not None
    assert wait_for(lambda: len(node_pids(srv)) == 2, 10, 0.1)
    first, second = sorted(node_pids(srv).values())
    time.sleep(1.2)  # both heartbeats written since they started accepting
    os.kill(first, signal.SIGSTOP)
    os.kill(second, signal.SIGSTOP)
    try:  # four connections wait in the queue; the first node wakes to all of them at once
        queued = [socket.create_connection((srv.host, srv.implicit_port), timeout=10) for _ in range(4)]
        os.kill(first, signal.SIGCONT)
        time.sleep(0.5)
    finally:
        os.kill(first, signal.SIGCONT)
        os.kill(second, signal.SIGCONT)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_socket(queued[2], server_hostname="x")  # the first node took two; this one waited
    tls.settimeout(10)
    assert tls.recv(100).startswith(b"220")
    # Both nodes are full: the first with two silent handshakes, the second with that
    # session and one silent handshake. A plain client is told 421 within a second or
    # so, not left waiting for the 60 s handshake timeout.
    with socket.create_connection((srv.host, srv.port), timeout=10) as c:
        c.settimeout(5)
        assert c.recv(100).startswith(b"421")
    tls.close()
    for q in queued:
        q.close()


def test_max_line_length(server_factory: Factory) -> None:
    srv = server_factory(server={"max_line_length": 600})
    c = Raw(srv)
    assert c.cmd("USER " + "a" * 500) == 331
    assert c.cmd("USER " + "a" * 700) == 500
    c.login()
    assert c.cmd("NOOP") == 200
    c.close()
