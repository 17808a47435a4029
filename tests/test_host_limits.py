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
from .test_bans import greet, login


def hold(srv, src: str) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), source_address=(src, 0), timeout=10)
    assert s.recv(100).startswith(b"220")
    return s


def test_max_connections_per_host_over_nodes(server_factory):
    srv = server_factory(nodes=2, server={"max_connections_per_host": 3})
    held = [hold(srv, "127.0.0.50") for _ in range(3)]
    assert wait_for(lambda: greet(srv, "127.0.0.50").startswith(b"421"))
    assert greet(srv, "127.0.0.51").startswith(b"220")
    held.pop().close()
    assert wait_for(lambda: greet(srv, "127.0.0.50").startswith(b"220"))
    for s in held:
        s.close()


def test_max_clients_per_host_and_user(server_factory):
    srv = server_factory(nodes=2, server={"max_clients_per_host": 1, "max_clients_per_user": 2})
    a = login(srv, "127.0.0.52")
    with pytest.raises(ftplib.error_perm, match="530 Too many logged-in clients"):
        login(srv, "127.0.0.52")
    b = login(srv, "127.0.0.53")
    with pytest.raises(ftplib.error_perm, match="530 Too many sessions for alice"):
        login(srv, "127.0.0.57")
    a.quit()
    wait_for(lambda: True, timeout=0.5)
    c = wait_for(lambda: _try_login(srv, "127.0.0.57"))
    assert c
    for f in (b, c):
        f.quit()


def _try_login(srv, src):  # type: ignore[no-untyped-def]
    try:
        return login(srv, src)
    except ftplib.error_perm:
        return None


def test_max_hosts_per_user(server_factory):
    srv = server_factory(nodes=2, server={"max_hosts_per_user": 1})
    a = login(srv, "127.0.0.54")
    b = login(srv, "127.0.0.54")  # the same host again is fine
    with pytest.raises(ftplib.error_perm, match="530 Too many hosts"):
        login(srv, "127.0.0.55")
    a.quit()
    b.quit()
    assert wait_for(lambda: _try_login(srv, "127.0.0.55"))


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
    f = login(srv, "127.0.0.56")
    pid = session_pid(f)
    os.kill(pid, signal.SIGKILL)
    f.close()
    assert wait_for(lambda: _try_login(srv, "127.0.0.56"), timeout=15)
