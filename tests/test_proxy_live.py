"""PROXY protocol on a real server: the header's address is the session's, trusted
peers must send one, untrusted peers' headers are not believed, passive listeners
with PROXY check the real client, and a real haproxy in front works end to end."""

from __future__ import annotations

import ftplib
import io
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from ftpcluster.worker.proxy_protocol import PP2_TYPE_ALPN, PP2_TYPE_UNIQUE_ID, build_v1, build_v2

from .support_haproxy import (
    Backend,
    HAProxy,
    TLSOverSocket,
    closed_without_banner,
    connect_with_header,
    ftp_over,
    render_config,
    start_with_proxy,
)
from .support_server import PASSWORD, Server, cli, free_port, make_server, require, wait_for

REPO = Path(__file__).resolve().parent.parent
FAKE4 = ("203.0.113.7", 40123)
DEST4 = ("192.0.2.1", 21)


def _proxy_server(tmp: Path, passive: bool = False, implicit: bool = False, **server: object) -> Server:
    srv = make_server(
        tmp,
        implicit=implicit,
        proxy_protocol={"enabled": True, "trusted": ["127.0.0.1/32"], "timeout": "1s", "passive": passive},
        server={"max_login_attempts": 5, **server},
    )
    srv.home.mkdir(parents=True, exist_ok=True)
    (srv.home / "hello.txt").write_bytes(b"hello through the balancer\n" * 100)
    return srv


REFUSED = "198.51.100.66"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = _proxy_server(tmp_path_factory.mktemp("proxied"), implicit=True)
    srv.metrics_port = free_port()  # type: ignore[attr-defined]
    with open(srv.config, "a") as f:
        f.write(f'\n[metrics]\nlisten = "127.0.0.1:{srv.metrics_port}"\n')  # type: ignore[attr-defined]
    try:
        start_with_proxy(srv)
        r = cli("ban", "host", REFUSED, "--for", "1h", "--reason", "proxied test", config=srv.config)
        assert r.returncode == 0, r.stderr
        yield srv
    finally:
        srv.stop()


def _stat(f: ftplib.FTP) -> str:
    return f.sendcmd("STAT")


@pytest.mark.parametrize(
    "header, seen",
    [
        (build_v1(FAKE4, DEST4), "203.0.113.7"),
        (build_v2(("198.51.100.9", 5000), DEST4), "198.51.100.9"),
        (build_v1(("2001:db8::7", 5000), ("2001:db8::1", 21)), "2001:db8::7"),
        (build_v2(("2001:db8::8", 5000), ("2001:db8::1", 21), [(PP2_TYPE_ALPN, b"ftp"), (PP2_TYPE_UNIQUE_ID, b"id-1")], crc=True), "2001:db8::8"),
    ],
    ids=["v1-tcp4", "v2-inet", "v1-tcp6", "v2-inet6-tlv-crc"],
)
def test_header_address_is_the_session_address(proxied: Server, header: bytes, seen: str) -> None:
    f = ftp_over(connect_with_header(proxied.host, proxied.port, header))
    try:
        f.login(proxied.user, PASSWORD)
        assert f"Connected from {seen}" in _stat(f)
    finally:
        f.close()


def test_header_and_first_command_in_one_segment(proxied: Server) -> None:
    sock = connect_with_header(proxied.host, proxied.port, build_v2(FAKE4, DEST4) + f"USER {proxied.user}\r\n".encode())
    f = ftp_over(sock)
    try:
        assert f.getresp().startswith("331")  # the USER that rode with the header was not eaten
        f.sendcmd(f"PASS {PASSWORD}")
        assert "Connected from 203.0.113.7" in _stat(f)
    finally:
        f.close()


def test_plain_passive_transfer_comes_from_the_balancer(proxied: Server) -> None:
    """Data listener without PROXY: the data connection may come from the proxy's address."""
    f = ftp_over(connect_with_header(proxied.host, proxied.port, build_v1(FAKE4, DEST4)))
    try:
        f.login(proxied.user, PASSWORD)
        buf = io.BytesIO()
        f.retrbinary("RETR hello.txt", buf.write)
        assert buf.getvalue() == (proxied.home / "hello.txt").read_bytes()
    finally:
        f.close()


def test_implicit_tls_header_and_client_hello_in_one_segment(proxied: Server) -> None:
    assert proxied.implicit_port is not None
    sock = socket.create_connection((proxied.host, proxied.implicit_port), timeout=10)
    tls = TLSOverSocket(sock, build_v2(("198.51.100.20", 7000), ("192.0.2.1", 990)))
    try:
        assert tls.reply().startswith("220")
        tls.send(f"USER {proxied.user}")
        assert tls.reply().startswith("331")
        tls.send(f"PASS {PASSWORD}")
        assert tls.reply().startswith("230")
        tls.send("STAT")
        assert "Connected from 198.51.100.20" in tls.reply()
    finally:
        tls.close()


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # silent until the timeout
        b"PROXY TCP4 203.0.113.7 192.0.2.1 1",  # partial, then silent
        b"PROXY TCP4 203.0.113.7 192.0.2.1 01 21\r\n",  # malformed
        bytes(build_v2(FAKE4, DEST4, crc=True)[:-1]) + b"\x00",  # bad CRC32C
        b"USER alice\r\n",  # no header at all
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",  # oversize length
    ],
    ids=["silent", "partial", "malformed", "bad-crc", "no-header", "oversize"],
)
def test_trusted_peer_without_a_valid_header_is_dropped(proxied: Server, sent: bytes) -> None:
    sock = connect_with_header(proxied.host, proxied.port, sent)
    with sock:
        assert closed_without_banner(sock)


def test_local_header_uses_the_real_address(proxied: Server) -> None:
    for header in (build_v2(None, None), build_v1(None, None)):
        f = ftp_over(connect_with_header(proxied.host, proxied.port, header))
        try:
            f.login(proxied.user, PASSWORD)
            assert "Connected from 127.0.0.1" in _stat(f)
        finally:
            f.close()


def test_untrusted_peer_header_is_not_believed(proxied: Server) -> None:
    """From 127.0.0.2 (not trusted) no header is read: the banner comes at once and a
    PROXY line is an unknown command; the session keeps the real address."""
    sock = socket.create_connection((proxied.host, proxied.port), timeout=10, source_address=("127.0.0.2", 0))
    f = ftp_over(sock)
    try:
        assert f.welcome.startswith("220")
        with pytest.raises(ftplib.error_perm):
            f.sendcmd(build_v1(FAKE4, DEST4).decode().strip())
        f.login(proxied.user, PASSWORD)
        stat = _stat(f)
        assert "Connected from 127.0.0.2" in stat and "203.0.113.7" not in stat
    finally:
        f.close()


def test_passive_listener_with_proxy_checks_the_real_client(tmp_path: Path) -> None:
    srv = _proxy_server(tmp_path / "p", passive=True)
    try:
        start_with_proxy(srv)
        f = ftp_over(connect_with_header(srv.host, srv.port, build_v1(FAKE4, DEST4)))
        f.login(srv.user, PASSWORD)
        f.voidcmd("TYPE I")
        host, port = f.makepasv()
        # A thief behind the same balancer: its header names another client.
        thief = connect_with_header(srv.host, port, build_v1(("203.0.113.99", 1), ("192.0.2.1", port)))
        f.putcmd("RETR hello.txt")
        assert closed_without_banner(thief)
        thief.close()
        good = connect_with_header(srv.host, port, build_v2(FAKE4, ("192.0.2.1", port)))
        good.settimeout(10)
        data = b""
        while chunk := good.recv(65536):
            data += chunk
        good.close()
        assert data == (srv.home / "hello.txt").read_bytes()
        replies = f.getresp()
        if replies.startswith("150"):
            replies = f.getresp()
        assert replies.startswith("226")
        f.close()
    finally:
        srv.stop()


# ------------------------------------------------------------------ haproxy
def test_deploy_example_is_valid_haproxy_config() -> None:
    require("haproxy")
    r = subprocess.run(["haproxy", "-c", "-f", str(REPO / "deploy" / "haproxy.cfg")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("passive_proxy", [True, False], ids=["passive-proxy", "passive-plain"])
def test_through_a_real_haproxy(tmp_path: Path, passive_proxy: bool) -> None:
    """Client 127.0.0.5 -> haproxy on 127.0.0.2 (send-proxy-v2) -> server on 127.0.0.1."""
    require("haproxy")
    srv = _proxy_server(tmp_path / "srv", passive=passive_proxy, implicit=True, masquerade_address="127.0.0.2")
    front = "127.0.0.2"
    ctl, ftps = free_port(front), free_port(front)
    stats = tmp_path / "haproxy" / "stats.sock"
    backend = Backend(srv.host, srv.port, srv.implicit_port, srv.passive)
    ha = HAProxy(tmp_path / "haproxy", render_config(front, ctl, ftps, backend, stats, passive_proxy), stats)
    try:
        assert ha.check().returncode == 0, ha.check().stdout
        start_with_proxy(srv)
        ha.start()
        ha.wait_server_up("ftp_control", "ftp-a")  # the health check spoke PROXY (LOCAL) and got 220
        # Its sessions make no connect/disconnect lines at info (one a second otherwise).
        # (only health checks came so far; the log is written in batches: give it a moment)
        assert not wait_for(lambda: '"event": "connect"' in srv.logs(), timeout=1.0)
        f = ftplib.FTP(timeout=10, source_address=("127.0.0.5", 0))
        f.connect(front, ctl)
        try:
            f.login(srv.user, PASSWORD)
            assert "Connected from 127.0.0.5" in _stat(f)
            payload = bytes(range(256)) * 400
            f.storbinary("STOR up.bin", io.BytesIO(payload))
            buf = io.BytesIO()
            f.retrbinary("RETR up.bin", buf.write)
            assert buf.getvalue() == payload
            assert any(line.endswith("up.bin") for line in f.nlst())
        finally:
            f.close()
        # Implicit FTPS through the balancer: the v2 header precedes the ClientHello.
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        raw = socket.create_connection((front, ftps), timeout=10, source_address=("127.0.0.5", 0))
        with ctx.wrap_socket(raw) as tls:
            g = ftp_over(tls)
            g.login(srv.user, PASSWORD)
            assert "Connected from 127.0.0.5" in _stat(g)
            g.close()
    finally:
        ha.stop()
        srv.stop()


def test_refusal_applies_to_the_header_address(proxied: Server) -> None:
    """A ban (`ftpcluster ban host`, set at the fixture) is checked again on the
    address the header names, not on the balancer's."""
    sock = connect_with_header(proxied.host, proxied.port, build_v2((REFUSED, 1), DEST4))
    with sock:
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(1024):
            data += chunk
        assert data.startswith(b"530") and b"proxied test" in data, data
    f = ftp_over(connect_with_header(proxied.host, proxied.port, build_v2(("198.51.100.67", 1), DEST4)))
    f.login(proxied.user, PASSWORD)
    f.close()


def _proxy_counts(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ftpcluster_proxy_headers_total{"):
            counts[line.split('result="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def test_headers_are_counted_in_metrics(proxied: Server) -> None:
    """Counted per header: the shared server's earlier tests moved these counters
    too, so compare against a reading taken just before."""
    port = proxied.metrics_port  # type: ignore[attr-defined]
    before = _proxy_counts(port)
    for _ in range(3):
        ftp_over(connect_with_header(proxied.host, proxied.port, build_v1(FAKE4, DEST4))).close()
    for _ in range(2):
        with connect_with_header(proxied.host, proxied.port, b"PROXY BOGUS\r\n") as bad:
            assert closed_without_banner(bad)

    def moved() -> dict[str, float] | None:  # shared-memory metrics: visible at once; bounded anyway
        now = _proxy_counts(port)
        delta = {k: now.get(k, 0) - before.get(k, 0) for k in ("ok", "rejected")}
        return delta if delta == {"ok": 3, "rejected": 2} else None

    delta = None
    for _ in range(50):
        if delta := moved():
            break
        time.sleep(0.1)
    assert delta == {"ok": 3, "rejected": 2}, (before, _proxy_counts(port))
