"""Bans on one host with real processes: rules, every node refusing, permit, user,
user@host and class bans, expiry, kicking open sessions, the allow-list, restart,
the CLI's errors. Attacker and victim use distinct loopback source addresses."""

from __future__ import annotations

import ftplib
import json
import socket
import time

import pytest

from .support_server import cli, wait_for

RULE_2_FAILED_SESSIONS = {"event": "MaxLoginAttempts", "threshold": 2, "window": "1m", "duration": "1h"}


def greet(srv, src: str) -> bytes:
    with socket.create_connection((srv.host, srv.port), source_address=(src, 0), timeout=10) as s:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            data += chunk
        return data


def login(srv, src: str, user: str | None = None, password: str | None = None) -> ftplib.FTP:
    f = ftplib.FTP(timeout=10)
    f.connect(srv.host, srv.port, source_address=(src, 0))
    f.login(user or srv.user, password or srv.password)
    return f


def bans_json(srv) -> list[dict]:
    r = cli("bans", "--json", config=srv.config)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_rule_fires_and_every_node_refuses_then_permit(server_factory):
    srv = server_factory(nodes=2, server={"max_login_attempts": 1}, ban={"rules": [RULE_2_FAILED_SESSIONS]})
    for _ in range(2):
        with pytest.raises(ftplib.error_perm, match="530"):
            login(srv, "127.0.0.5", password="wrong")
    # Many connections: the balancing kernel spreads them over both nodes.
    replies = [greet(srv, "127.0.0.5") for _ in range(12)]
    assert all(r.startswith(b"530 ") for r in replies), replies
    assert b"MaxLoginAttempts" in replies[0]
    f = login(srv, "127.0.0.6")  # the victim's neighbour is served
    f.quit()
    (ban,) = bans_json(srv)
    assert ban["kind"] == "host" and ban["name"] == "127.0.0.5" and ban["origin"] == "local"
    assert ban["expires_at"] > time.time() + 3000
    r = cli("permit", "host", "127.0.0.5", config=srv.config)
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: greet(srv, "127.0.0.5").startswith(b"220"))
    assert bans_json(srv) == []


def test_user_userhost_and_class_bans(server_factory):
    srv = server_factory(nodes=2, ban={"classes": {"lab": ["127.0.0.32/28"]}})
    assert cli("ban", "user", "alice@127.0.0.8", config=srv.config).returncode == 0
    with pytest.raises(ftplib.error_perm, match="530"):
        login(srv, "127.0.0.8")
    login(srv, "127.0.0.9").quit()
    assert cli("permit", "user", "alice@127.0.0.8", config=srv.config).returncode == 0
    login(srv, "127.0.0.8").quit()

    assert cli("ban", "user", "alice", "--reason", "audit", config=srv.config).returncode == 0
    f = ftplib.FTP(timeout=10)
    f.connect(srv.host, srv.port, source_address=("127.0.0.9", 0))
    with pytest.raises(ftplib.error_perm, match="530 Banned: audit"):
        f.login(srv.user, srv.password)
    assert f.voidcmd("NOOP").startswith("200")  # the session stays, as in ProFTPD
    f.close()
    assert cli("permit", "user", "alice", config=srv.config).returncode == 0

    assert cli("ban", "class", "lab", config=srv.config).returncode == 0
    assert greet(srv, "127.0.0.40").startswith(b"530")
    assert greet(srv, "127.0.0.60").startswith(b"220")
    kinds = {(b["kind"], b["name"]) for b in bans_json(srv)}
    assert kinds == {("class", "lab")}


def test_network_ban_and_expiry(server_factory):
    srv = server_factory()
    assert cli("ban", "host", "127.0.0.64/30", "--for", "2s", config=srv.config).returncode == 0
    assert greet(srv, "127.0.0.65").startswith(b"530")
    assert greet(srv, "127.0.0.70").startswith(b"220")
    assert wait_for(lambda: greet(srv, "127.0.0.65").startswith(b"220"), timeout=15, step=0.3)


def test_ban_ends_open_sessions(server_factory):
    srv = server_factory(nodes=2)
    victims = [login(srv, "127.0.0.10") for _ in range(4)]
    other = login(srv, "127.0.0.11")
    assert cli("ban", "host", "127.0.0.10", "--reason", "kicked", config=srv.config).returncode == 0

    def all_closed() -> bool:
        for f in victims:
            f.sock.settimeout(0.2)
            try:
                if f.sock.recv(1024) not in (b"",) and f.sock.recv(1024) != b"":
                    return False
            except (socket.timeout, TimeoutError):
                return False
            except OSError:
                pass
        return True

    assert wait_for(all_closed, timeout=10)
    assert other.voidcmd("NOOP").startswith("200")
    other.quit()


def test_never_list_is_never_banned(server_factory):
    srv = server_factory(server={"max_login_attempts": 1},
                         ban={"never": ["127.0.0.12/32"], "rules": [{**RULE_2_FAILED_SESSIONS, "threshold": 1}]})  # fmt: skip
    for _ in range(3):
        with pytest.raises(ftplib.error_perm):
            login(srv, "127.0.0.12", password="wrong")
    assert greet(srv, "127.0.0.12").startswith(b"220")
    r = cli("ban", "host", "127.0.0.12", config=srv.config)
    assert r.returncode == 1 and "never" in r.stderr


def test_bans_survive_restart(server_factory):
    srv = server_factory()
    assert cli("ban", "host", "127.0.0.13", config=srv.config).returncode == 0
    assert cli("ban", "user", "mallory", "--for", "1h", config=srv.config).returncode == 0
    srv.stop()
    srv.start()
    assert greet(srv, "127.0.0.13").startswith(b"530")
    assert {b["name"] for b in bans_json(srv)} == {"127.0.0.13", "mallory"}
    # Even when the shared-memory file is gone (a tmpfs state dir after a reboot).
    srv.stop()
    for p in (srv.dir / "state").glob("bans*.shm"):
        p.unlink()
    srv.start()
    assert greet(srv, "127.0.0.13").startswith(b"530")


@pytest.fixture(scope="module")
def idle_server(module_server_factory):
    """A running server the bad commands are refused against (they change nothing)."""
    return module_server_factory()


@pytest.mark.parametrize(
    "args",
    [
        ("ban", "host", "999.1.1.1"),
        ("ban", "host", "10.0.0.0/99"),
        ("ban", "user", "bad name!"),
        ("ban", "class", "nosuchclass"),
        ("ban", "host", "10.0.0.1", "--for", "soon"),
        ("permit", "host", "nonsense"),
    ],
)
def test_cli_errors(idle_server, args):
    r = cli(*args, config=idle_server.config)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip() and "Traceback" not in r.stderr


def test_event_rules_unhandled_command_and_connect_rate(server_factory):
    srv = server_factory(ban={"rules": [
        {"event": "UnhandledCommand", "threshold": 3, "window": "1m", "duration": "10m"},
        {"event": "ClientConnectRate", "threshold": 8, "window": "1m", "duration": "10m"},
    ]})  # fmt: skip
    with socket.create_connection((srv.host, srv.port), source_address=("127.0.0.20", 0), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        for _ in range(3):
            s.sendall(b"FROB\r\n")
            f.readline()
    assert wait_for(lambda: greet(srv, "127.0.0.20").startswith(b"530"))
    replies = [greet(srv, "127.0.0.21") for _ in range(10)]
    assert replies[0].startswith(b"220") and replies[-1].startswith(b"530"), replies
    assert greet(srv, "127.0.0.22").startswith(b"220")


def test_no_transfer_timeout_and_its_ban_rule(server_factory):
    rule = {"event": "TimeoutNoTransfer", "threshold": 1, "window": "1m", "duration": "10m"}
    srv = server_factory(server={"no_transfer_timeout": "1s"}, ban={"rules": [rule]})
    f = login(srv, "127.0.0.23")

    def ended() -> bool:
        try:
            f.voidcmd("NOOP")  # busy, but never transferring
        except (ftplib.error_temp, ftplib.error_perm, EOFError, OSError):
            return True  # 421 no-transfer timeout, or 530 from the ban it triggered
        return False

    assert wait_for(ended, timeout=10, step=0.3)
    assert wait_for(lambda: greet(srv, "127.0.0.23").startswith(b"530"))
    g = login(srv, "127.0.0.24")
    (srv.home / "x").write_bytes(b"1")
    for _ in range(3):  # a session that keeps transferring is not cut
        got: list[bytes] = []
        g.retrbinary("RETR x", got.append)
        assert b"".join(got) == b"1"
        time.sleep(0.5)
    g.quit()
