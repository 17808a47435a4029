"""Hostile and broken clients over raw sockets: half lines, clients vanishing
mid-transfer, fd leaks. (What the session core answers to junk, huge lines, commands
out of order, path escapes and a read-only user is in tests/session/.)

Every test ends by checking that the node process that served it is the same
one that served its first session: the worker never crashed."""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from pathlib import Path

import pytest

from .support_server import PASSWORD, Server, closed_by_peer, wait_for

TEMP_PREFIX = ".ftpcluster-upload."
SESSION_RE = re.compile(rb"Session (\d+)-(\d+)-(\d+)")


class Raw:
    """A control connection on a bare socket, so we can send what ftplib never would."""

    def __init__(self, server: Server, timeout: float = 10) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by server")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> tuple[int, bytes]:
        """One whole reply (multi-line replies end at 'NNN ')."""
        first = self._line()
        text = [first]
        if first[3:4] == b"-":
            while not (len(text[-1]) >= 4 and text[-1][:3] == first[:3] and text[-1][3:4] == b" "):
                text.append(self._line())
        return int(first[:3]), b"\n".join(text)

    def cmd(self, line: str | bytes) -> int:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()[0]

    def login(self, user: str = "alice", password: str = PASSWORD) -> None:
        assert self.cmd(f"USER {user}") == 331
        assert self.cmd(f"PASS {password}") == 230

    def pasv(self) -> socket.socket:
        code, text = self.reply_to("EPSV")
        assert code == 229, text
        port = int(text.split(b"|")[3])
        return socket.create_connection(("127.0.0.1", port), timeout=10)

    def reply_to(self, line: str) -> tuple[int, bytes]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed_by_server(self, timeout: float = 5) -> bool:
        """True when the server closed the connection (after any pending replies)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with RST, like a client that crashed."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def node_pid(server: Server) -> int:
    """The pid of the node process serving us, from STAT's 'Session <node>-<pid>-<n>'."""
    c = Raw(server)
    code, text = c.reply_to("STAT")
    c.close()
    m = SESSION_RE.search(text)
    assert code == 211 and m, text
    return int(m.group(2))


@pytest.fixture
def node(server: Server):
    """The server plus the node pid seen at the start; checked unchanged at the end."""
    pid = node_pid(server)
    yield server
    assert node_pid(server) == pid, "the node process was replaced: the worker crashed"
    assert server.proc is not None and server.proc.poll() is None


# ---------------------------------------------------------------- junk
# Junk, over-long lines, unknown verbs and commands out of order are answered by the
# session core (tests/session/test_bad_lines.py); here, lines split over TCP segments.
def test_half_lines(node: Server) -> None:
    c = Raw(node)
    c.send(b"US")
    time.sleep(0.2)
    c.send(b"ER alice\r")
    time.sleep(0.2)
    c.send(b"\n")
    assert c.reply()[0] == 331
    c.send(b"PASS " + PASSWORD.encode() + b"\n")  # a bare LF ends a line too
    assert c.reply()[0] == 230
    for b in b"NOOP\r\n":  # one byte per segment
        c.send(bytes([b]))
        time.sleep(0.005)
    assert c.reply()[0] == 200
    c.send(b"NOOP\r\nPWD\r\nSYST\r\n")  # several lines in one segment
    assert [c.reply()[0] for _ in range(3)] == [200, 257, 215]
    c.send(b"RETR half-a-comm")  # half a line, then the client goes away
    c.close()
    c2 = Raw(node)
    c2.send(b"NOOP")
    c2.reset()


# ---------------------------------------------------------------- confinement
# Path escapes and the read-only account are refused by the session core:
# tests/session/test_paths.py. LINKS names the home's links that point outside.
LINKS = {"out_link", "file_link", "dangling_out"}


# ---------------------------------------------------------------- vanishing clients
def _leftovers(home: Path) -> list[str]:
    return [n for n in os.listdir(home) if n.startswith(TEMP_PREFIX) or n == "up.bin"]


def _start_stor(server: Server, name: str = "up.bin") -> tuple[Raw, socket.socket]:
    c = Raw(server)
    c.login()
    data = c.pasv()
    assert c.cmd(f"STOR {name}") == 150
    data.sendall(os.urandom(300_000))
    assert wait_for(lambda: any(n.startswith(TEMP_PREFIX) for n in os.listdir(server.home)), 5), "no temp file"
    return c, data


@pytest.mark.parametrize("how", ["reset-both", "close-control-only", "reset-control-keep-data"])
def test_disconnect_mid_stor_leaves_nothing(node: Server, how: str) -> None:
    c, data = _start_stor(node)
    if how == "reset-both":
        rst_close(data)
        c.reset()
    elif how == "close-control-only":
        c.close()
    else:
        c.reset()
    assert wait_for(lambda: _leftovers(node.home) == [], 10), _leftovers(node.home)
    if how != "reset-both":
        # Whatever the data side does afterwards, nothing may appear.
        try:
            data.sendall(b"x" * 1000)
        except OSError:
            pass
        # The server must drop the data connection of a session that ended; only then
        # is "nothing appeared" a statement about the end of that session.
        assert closed_by_peer(data, 10), "the data connection outlived its session"
        data.close()
        assert _leftovers(node.home) == []


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fd_count(pid: int) -> int:
    """The node's fd count once two readings 0.2 s apart agree (the warm-up session's
    sockets are closed), not whatever it is at a fixed moment."""
    last = _fd_count(pid)
    for _ in range(25):
        time.sleep(0.2)
        now = _fd_count(pid)
        if now == last:
            return now
        last = now
    return last


def test_no_fd_leak_after_aborted_transfers(node: Server) -> None:
    home = node.home
    with open(home / "big.bin", "wb") as fh:
        fh.truncate(64 * 1024 * 1024)  # sparse
    pid = node_pid(node)
    # Warm up: one normal session with a transfer (lazy files, executor threads).
    c = Raw(node)
    c.login()
    d = c.pasv()
    assert c.cmd("RETR big.bin") == 150
    rst_close(d)
    c.reply()
    c.cmd("QUIT")
    c.close()
    baseline = _settled_fd_count(pid)

    for i in range(20):
        kind = i % 4
        c = Raw(node)
        c.login()
        if kind == 0:  # ABOR during RETR
            d = c.pasv()
            assert c.cmd("RETR big.bin") == 150
            d.recv(1000)
            c.send(b"ABOR\r\n")
            codes = {c.reply()[0], c.reply()[0]}
            assert codes <= {426, 226, 225}, codes
            d.close()
            assert c.cmd("NOOP") == 200
            c.close()
        elif kind == 1:  # vanish mid-STOR
            data = c.pasv()
            assert c.cmd(f"STOR up{i}.bin") == 150
            data.sendall(b"x" * 200_000)
            rst_close(data)
            c.reset()
        elif kind == 2:  # vanish mid-RETR
            d = c.pasv()
            assert c.cmd("RETR big.bin") == 150
            d.recv(1000)
            c.reset()
            rst_close(d)
        else:  # passive port opened, never used, then vanish
            d = c.pasv()
            d.close()
            c2 = Raw(node)  # and a session that never logs in
            c.reset()
            c2.reset()

    ok = wait_for(lambda: _fd_count(pid) <= baseline + 2, 15, 0.2)
    assert ok, f"fds: baseline {baseline}, now {_fd_count(pid)}: {sorted(os.listdir(f'/proc/{pid}/fd'))}"
    assert wait_for(lambda: not [n for n in os.listdir(home) if n.startswith(TEMP_PREFIX)], 10)
    assert not [n for n in os.listdir(home) if n.startswith("up")]
