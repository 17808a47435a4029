"""Helpers for PROXY protocol tests: start an ftpcluster server that reads PROXY headers,
run a real haproxy on loopback, speak FTP (and implicit FTPS) behind a header."""

from __future__ import annotations

import csv
import ftplib
import io
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ftpcluster.worker.proxy_protocol import build_v2

from .support_server import Server

def start_with_proxy(srv: Server, nodes: int = 1, timeout: float = 20) -> Server:
    """Start `srv` (PROXY enabled in its config) with the real `ftpcluster start`, and
    wait until it greets a LOCAL header (a trusted peer's plain probe gets dropped)."""
    srv.start(nodes=nodes, wait=False)
    assert srv.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.logs()}")
        try:
            with socket.create_connection((srv.host, srv.port), timeout=1) as s:
                s.settimeout(3)
                s.sendall(build_v2(None, None))
                if s.recv(3) == b"220":
                    return srv
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{srv.host}:{srv.port} did not greet a PROXY LOCAL header:\n{srv.logs()}")


def ftp_over(sock: socket.socket, timeout: float = 10) -> ftplib.FTP:
    """An ftplib client on an already connected socket (after we sent a header on it)."""
    f = ftplib.FTP(timeout=timeout)
    sock.settimeout(timeout)
    f.sock = sock
    f.af = sock.family
    f.host = sock.getpeername()[0]
    f.file = sock.makefile("r", encoding=f.encoding)
    f.welcome = f.getresp()
    return f


def connect_with_header(host: str, port: int, header: bytes, source: str | None = None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0) if source else None)
    sock.sendall(header)
    return sock


def closed_without_banner(sock: socket.socket, timeout: float = 15) -> bool:
    """True if the server closes the connection having sent nothing (or only a reset)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


class TLSOverSocket:
    """Implicit FTPS by hand: the ClientHello goes out in the same send() as the PROXY
    header, the case where a reader that buffers ahead would lose it."""

    def __init__(self, sock: socket.socket, header: bytes, timeout: float = 10) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = sock
        sock.settimeout(timeout)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out)
        self.buf = b""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        sock.sendall(header + self.out.read())
        for _ in range(100):
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._pull()
        self._flush()

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _pull(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed during TLS")
        self.inc.write(data)

    def send(self, line: str) -> None:
        self.obj.write(line.encode() + b"\r\n")
        self._flush()

    def reply(self) -> str:
        """One complete (possibly multi-line) FTP reply."""
        for _ in range(1000):
            text = self.buf.decode(errors="replace")
            lines = text.split("\r\n")
            if len(lines) > 1 and len(lines[0]) >= 4:
                code = lines[0][:3]
                multi = lines[0][3] == "-"
                for i, line in enumerate(lines[:-1]):
                    if (not multi and i == 0) or (multi and line.startswith(code + " ")):
                        end = len("\r\n".join(lines[: i + 1])) + 2
                        self.buf = self.buf[end:]
                        return "\r\n".join(lines[: i + 1])
            try:
                self.buf += self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._pull()
        raise TimeoutError("no complete reply")

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ haproxy
def have_haproxy() -> bool:
    return shutil.which("haproxy") is not None


@dataclass
class Backend:
    host: str
    control_port: int
    implicit_port: int | None
    passive: tuple[int, int]


def render_config(front: str, control_port: int, implicit_port: int | None, backend: Backend, stats: Path, passive_proxy: bool) -> str:
    """A loopback version of deploy/haproxy.cfg for one host."""
    b = backend
    lines = [
        "global",
        f"    stats socket {stats} mode 600 level admin",
        "    maxconn 500",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        "frontend ftp_control",
        f"    bind {front}:{control_port}",
        "    default_backend ftp_control",
        "backend ftp_control",
        "    balance source",
        "    stick-table type ipv6 size 1k expire 30m",
        "    stick on src",
        "    option tcp-check",
        "    tcp-check connect default",
        "    tcp-check expect rstring ^220",
        '    tcp-check send "QUIT\\r\\n"',
        "    tcp-check expect rstring ^221",
        "    default-server send-proxy-v2 check check-send-proxy inter 500ms fall 2 rise 1",
        f"    server ftp-a {b.host}:{b.control_port} id 1",
    ]
    if implicit_port is not None and b.implicit_port is not None:
        lines += [
            "frontend ftps_implicit",
            f"    bind {front}:{implicit_port}",
            "    default_backend ftps_implicit",
            "backend ftps_implicit",
            "    stick on src table ftp_control",
            f"    server ftp-a {b.host}:{b.implicit_port} id 1 send-proxy-v2 track ftp_control/ftp-a",
        ]
    lines += [
        "frontend ftp_passive_a",
        f"    bind {front}:{b.passive[0]}-{b.passive[1]}",
        "    default_backend ftp_passive_a",
        "backend ftp_passive_a",
        f"    server ftp-a {b.host}{' send-proxy-v2' if passive_proxy else ''} track ftp_control/ftp-a",
    ]
    return "\n".join(lines) + "\n"


class HAProxy:
    def __init__(self, workdir: Path, config_text: str, stats: Path | None = None) -> None:
        """`stats`: the stats socket the config names (default workdir/haproxy.sock)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(config_text)
        self.log = workdir / "haproxy.log"
        self.stats = stats or workdir / "haproxy.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["haproxy", "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=30)

    def start(self, timeout: float = 15) -> "HAProxy":
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                self.show_stat()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("haproxy's stats socket did not answer")

    def show_stat(self) -> list[dict[str, str]]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        text = data.decode().lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def wait_server_up(self, backend: str, server: str, timeout: float = 20) -> dict[str, str]:
        """Until the health check (which speaks PROXY) has passed at least once."""
        deadline = time.monotonic() + timeout
        row: dict[str, str] = {}
        while time.monotonic() < deadline:
            for row in self.show_stat():
                if row.get("pxname") == backend and row.get("svname") == server and row.get("status") == "UP" and row.get("check_status") == "L7OK":
                    return row
            time.sleep(0.1)
        raise TimeoutError(f"{backend}/{server} not UP by a passing check: {row}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(5)
