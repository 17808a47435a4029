"""Per-host and per-user limits counted over every node of a host, the ban
events they raise, and no stale counts after a node is killed."""

from __future__ import annotations

import ftplib
import os
import signal
import socket

import pytest

from .support_cluster import session_pid
from .support_server import wait_for
from .test_bad_input import rst_close
from .test_bans import greet, login
from .test_observability import json_lines


def hold(srv, src: str) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), source_address=(src, 0), timeout=10)
    assert s.recv(100).startswith(b"220")
    return s


def _login_or_none(srv, src):  # type: ignore[no-untyped-def]
    """A session from `src`, or None while a limit (421 at the door, 530 at PASS) refuses it."""
    try:
        return login(srv, src)
    except (ftplib.Error, EOFError, ConnectionError):
        return None


def _spread(srv, src: str, n: int, limit_left: int) -> list[ftplib.FTP]:
    """`n` logged-in sessions from `src` covering both nodes, never holding more than
    `limit_left` at once (a session on an already covered node is closed and retried)."""
    held: list[ftplib.FTP] = []
    for _ in range(40):
        nodes = {session_pid(f) for f in held}
        if len(held) >= n and len(nodes) == 2:
            return held
        if len(held) >= limit_left:  # all on one node so far: let one go and reconnect
            held.pop().quit()
        f = wait_for(lambda: _login_or_none(srv, src))
        assert f, "a session below the limit was refused"
        held.append(f)
    raise AssertionError(f"sessions from {src} never covered both nodes: {[session_pid(f) for f in held]}")


def _refusals(srv, limit: str) -> list[dict]:
    return [r for r in json_lines(srv.logs()) if r.get("event") == "login refused by limit" and r.get("limit") == limit]


def test_max_connections_per_host_over_nodes(server_factory):
    """Three connections held over both nodes (at most two on either): a per-node count
    would admit a fourth on either node; the host-wide count refuses it on both."""
    srv = server_factory(nodes=2, server={"max_connections_per_host": 3})
    held = _spread(srv, "127.0.0.50", 3, 3)
    assert len({session_pid(f) for f in held}) == 2
    replies = [greet(srv, "127.0.0.50") for _ in range(8)]
    assert all(r.startswith(b"421") for r in replies), replies
    assert greet(srv, "127.0.0.51").startswith(b"220")
    held.pop().quit()
    assert wait_for(lambda: greet(srv, "127.0.0.50").startswith(b"220"))
    for f in held:
        f.quit()


def test_max_clients_per_host_and_user(server_factory):
    srv = server_factory(nodes=2, server={"max_clients_per_host": 1, "max_clients_per_user": 2})
    a = login(srv, "127.0.0.52")
    # A second session from .52 is refused on every node (asserted through the nodes'
    # own log lines: keep trying until both nodes refused one).
    for i in range(1, 41):
        with pytest.raises(ftplib.error_perm, match="530 Too many logged-in clients"):
            login(srv, "127.0.0.52")
        assert wait_for(lambda: len(_refusals(srv, "MaxClientsPerHost")) >= i), "refusal not logged"
        if len({r["node"] for r in _refusals(srv, "MaxClientsPerHost")}) == 2:
            break
    assert {r["node"] for r in _refusals(srv, "MaxClientsPerHost")} == {1, 2}
    # alice's two sessions on different nodes: one per node, the user-wide count is 2.
    b = login(srv, "127.0.0.53")
    for _ in range(40):
        if session_pid(b) != session_pid(a):
            break
        b.quit()
        b = wait_for(lambda: _login_or_none(srv, "127.0.0.53"))
        assert b, "a session below the limit was refused"
    assert session_pid(b) != session_pid(a)
    for _ in range(4):
        with pytest.raises(ftplib.error_perm, match="530 Too many sessions for alice"):
            login(srv, "127.0.0.57")
    a.quit()
    c = wait_for(lambda: _login_or_none(srv, "127.0.0.57"))
    assert c
    for f in (b, c):
        f.quit()


def test_max_hosts_per_user(server_factory):
    srv = server_factory(nodes=2, server={"max_hosts_per_user": 1})
    a = login(srv, "127.0.0.54")
    b = login(srv, "127.0.0.54")  # the same host again is fine
    with pytest.raises(ftplib.error_perm, match="530 Too many hosts"):
        login(srv, "127.0.0.55")
    a.quit()
    b.quit()
    assert wait_for(lambda: _login_or_none(srv, "127.0.0.55"))


def test_limit_events_feed_ban_rules(server_factory):
    rule = {"event": "MaxConnectionsPerHost", "threshold": 2, "window": "1m", "duration": "1h"}
    srv = server_factory(server={"max_connections_per_host": 1}, ban={"rules": [rule]})
    held = hold(srv, "127.0.0.58")
    assert greet(srv, "127.0.0.58").startswith(b"421")
    greet(srv, "127.0.0.58")
    held.close()
    assert wait_for(lambda: greet(srv, "127.0.0.58").startswith(b"530"))


def test_killed_node_leaves_no_stale_counts(server_factory):
    srv = server_factory(nodes=1, server={"max_clients_per_host": 1})
    # A client that is gone (a reset) while its password is checked (the first check:
    # argon2, off the loop) is not logged in afterwards, and so holds no place under
    # the limit. (A FIN may be a half-close: that client is answered, then closed.)
    ghost = hold(srv, "127.0.0.59")
    ghost.sendall(f"USER {srv.user}\r\nPASS {srv.password}\r\n".encode())
    rst_close(ghost)
    assert wait_for(lambda: (f := _login_or_none(srv, "127.0.0.59")) and (f.quit() or True), timeout=10), "the ghost login counts"

    def ghost_events() -> list[str]:
        recs = [r for r in json_lines(srv.logs()) if r.get("client") == "127.0.0.59"]
        first = recs[0]["session"] if recs else None
        return [r["event"] for r in recs if r["session"] == first]

    assert wait_for(lambda: "disconnect" in ghost_events(), timeout=10)
    assert "login ok" not in ghost_events(), ghost_events()
    # A wrong guess from a client that leaves at once still counts (ban rules hear it).
    guess = hold(srv, "127.0.0.60")
    guess.sendall(f"USER {srv.user}\r\nPASS wrong-guess\r\n".encode())
    rst_close(guess)
    assert wait_for(lambda: [r for r in json_lines(srv.logs()) if r.get("event") == "login failed" and r.get("client") == "127.0.0.60"],
                    timeout=10), "a failed guess from a departed client went unrecorded"  # fmt: skip
    f = login(srv, "127.0.0.56")
    pid = session_pid(f)
    os.kill(pid, signal.SIGKILL)
    f.close()
    assert wait_for(lambda: _login_or_none(srv, "127.0.0.56"), timeout=15)
