"""A node against careless clients and its own crash, one module-scoped server
(1 node, implicit TLS, max_sessions_per_node 6, max_handshakes_per_host 3):

- implicit-TLS connections that never send a ClientHello count against
  max_sessions_per_node, and one address has at most max_handshakes_per_host of
  them in flight: past either limit the next connection gets 421 and is closed;
- a node killed mid-upload leaves its hidden temporary file; the replacement
  node removes it at start, but not a live process's temporary file (listed in
  that process's own journal)."""

from __future__ import annotations

import glob
import os
import signal
import socket
import ssl
from typing import Iterator

import pytest

from ftpcluster.worker.upload_journal import process_start

from .support_server import Server, make_server, wait_for
from .test_bad_input import Raw, node_pid

TEMP_PREFIX = ".ftpcluster-upload."


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = make_server(tmp_path_factory.mktemp("hardening"), implicit=True,
                    server={"max_sessions_per_node": 6}, tls={"max_handshakes_per_host": 3})  # fmt: skip
    s.start(nodes=1)
    s.home.mkdir(parents=True, exist_ok=True)
    yield s
    s.stop()


def _silent(srv: Server, source: str) -> socket.socket:
    """A TCP connection to the implicit-TLS port that never starts its handshake."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5)
    s.connect((srv.host, srv.implicit_port))
    return s


def _refused(s: socket.socket, wait: float = 10) -> bytes:
    """What the server sent before closing (b"" if it is still waiting after `wait` s)."""
    s.settimeout(wait)
    try:
        data = s.recv(200)
    except TimeoutError:
        return b""
    return data


def _sessions_ended(srv: Server, at_least: int) -> int:
    """How many sessions the node has opened once every one of them (at least
    `at_least`) is also closed, else 0. The node logs a session's disconnect after it
    stopped counting it against max_sessions_per_node, and that can be a couple of
    loop turns after the client saw the connection end: connections accepted in
    between still see it (a flaky 421 for the sixth silent connection)."""
    log = srv.logs()
    opened = log.count('"event": "connect"')
    return opened if opened >= at_least and log.count('"event": "disconnect"') == opened else 0


def _tls_greeting(srv: Server) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((srv.host, srv.implicit_port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:
                return tls.recv(100)
    except OSError:
        return b""


def test_silent_tls_connections_are_refused_past_the_limits(srv: Server) -> None:
    before = wait_for(lambda: _sessions_ended(srv, 1), timeout=10)  # the start-up probe's session
    assert before, srv.logs()[-2000:]
    assert _tls_greeting(srv).startswith(b"220")
    # The node no longer counts the greeting's session: every in-flight slot is ours.
    assert wait_for(lambda: _sessions_ended(srv, before + 1), timeout=10), srv.logs()[-2000:]
    silent: list[socket.socket] = []
    try:
        silent += [_silent(srv, "127.0.0.1") for _ in range(3)]
        extra = _silent(srv, "127.0.0.1")
        assert _refused(extra).startswith(b"421 Too many TLS handshakes"), "per-address bound"
        extra.close()
        silent += [_silent(srv, "127.0.0.3") for _ in range(3)]
        assert all(_refused(s, wait=1) == b"" for s in silent[-1:])  # still waiting for their ClientHello
        # Six handshakes in flight fill the node (max_sessions_per_node = 6): the next
        # connection, TLS or plain, from anyone, is refused at the door.
        late = _silent(srv, "127.0.0.4")
        assert _refused(late).startswith(b"421 Too many connections on this node")
        late.close()
        with socket.create_connection((srv.host, srv.port), timeout=5) as plain:
            assert plain.recv(100).startswith(b"421")
    finally:  # a failure here must not leave the node full for the next test
        for s in silent:
            s.close()
    assert wait_for(lambda: _tls_greeting(srv).startswith(b"220"), timeout=10)


def test_replacement_node_removes_a_dead_nodes_temp_file(srv: Server) -> None:
    home = srv.home
    # A live process's upload in flight: its temp file, listed in its own journal.
    me = os.getpid()
    sibling = home / f"{TEMP_PREFIX}{me}.0123456789abcdef"
    sibling.write_bytes(b"in flight")
    journal = srv.dir / "state" / "uploads" / f"{me}-{process_start(me)}"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text(f"{sibling}\n")
    # The node's own upload, killed half way.
    c = Raw(srv)
    c.login()
    assert c.cmd("TYPE I") == 200
    data = c.pasv()
    assert c.cmd("STOR big.bin") == 150
    data.sendall(b"x" * (1 << 20))
    pid = node_pid(srv)

    def node_temp() -> list[str]:
        return [p for p in glob.glob(str(home / f"{TEMP_PREFIX}{pid}.*")) if os.path.getsize(p) >= 1 << 20]

    temp = wait_for(node_temp, timeout=10)
    assert temp, os.listdir(home)
    os.kill(pid, signal.SIGKILL)
    data.close()
    c.sock.close()
    assert wait_for(lambda: _new_pid(srv, pid), timeout=20), "no replacement node"
    assert wait_for(lambda: not os.path.exists(temp[0]), timeout=5), os.listdir(home)
    assert sibling.read_bytes() == b"in flight" and journal.exists()
    assert not (home / "big.bin").exists()
    sibling.unlink()
    journal.unlink()


def _new_pid(srv: Server, old: int) -> bool:
    try:
        return node_pid(srv) != old
    except (OSError, AssertionError):
        return False
