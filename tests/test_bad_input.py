"""Hostile and broken clients over raw sockets: junk, half lines, huge lines, commands
out of order, path escapes, a read-only user, clients vanishing mid-transfer.

Every test ends by checking that the node process that served it is the same
one that served its first session: the worker never crashed."""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import time
from pathlib import Path
from typing import Callable

import pytest

from .support_server import PASSWORD, Server, cli, wait_for

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
def test_garbage_and_binary_junk(node: Server) -> None:
    rng = random.Random(959)
    c = Raw(node)
    for logged_in in (False, True):
        lines = []
        for _ in range(40):
            junk = bytes(b for b in rng.randbytes(rng.randrange(1, 300)) if b != 0x0A)
            lines.append(junk)
        c.send(b"".join(line + b"\r\n" for line in lines))
        for line in lines:
            code, text = c.reply()
            assert 400 <= code < 600, (line, text)
        assert c.cmd("NOOP") == 200
        if not logged_in:
            c.login()
    # Bytes that are not a verb at all, NULs inside a verb, a verb too long to be one.
    for line in (b"\x00\x00\x00", b"\xff\xfe\xfd", b"NO\x00OP", b"1234", b"A" * 40, b"  ", b"", b"\r\r\r"):
        assert c.cmd(line) == 500, line
    assert c.cmd("PWD") == 257
    c.close()


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


def test_100kb_line_refused_session_usable(node: Server) -> None:
    c = Raw(node)
    c.login()
    c.send(b"NOOP " + b"A" * 100_000 + b"\r\n")
    code, text = c.reply()
    assert code == 500 and b"too long" in text.lower()
    assert c.cmd("NOOP") == 200  # exactly one reply for the long line; the session goes on
    # The same line trickled in pieces without a LF for a while, then ended.
    for _ in range(25):
        c.send(b"B" * 4000)
    c.send(b"\r\n")
    assert c.reply()[0] == 500
    assert c.cmd("PWD") == 257
    # Just under the limit is a normal (if odd) command.
    assert c.cmd("NOOP" + " " * 4000) in (200, 501)
    assert c.cmd("NOOP") == 200
    c.close()


def test_unknown_commands_and_other_protocols(node: Server) -> None:
    c = Raw(node)
    for line in ("FOO", "XYZZY arg", "RETRX file", "SITE"):
        assert c.cmd(line) in (500, 501, 502, 530), line
    assert c.cmd("FOO") in (500, 502)
    assert c.cmd("HELP FOO") == 502
    c.login()
    assert c.cmd("FOO bar") in (500, 502)
    assert c.cmd("SITE EXEC /bin/sh") in (500, 502, 504)
    assert c.cmd("NOOP") == 200
    c.close()
    # An HTTP client on the FTP port gets one 500 and is closed.
    h = Raw(node)
    h.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.reply()[0] == 500
    assert h.closed_by_server()
    h.close()


def test_commands_out_of_order(node: Server) -> None:
    c = Raw(node)
    assert c.cmd("RETR x") == 530
    assert c.cmd("STOR x") == 530
    assert c.cmd("LIST") == 530
    assert c.cmd("CWD /") == 530
    assert c.cmd("PASV") == 530
    assert c.cmd("PASS nouser") == 503
    c.login()
    assert c.cmd("RNTO x") == 503
    (node.home / "f").write_bytes(b"x")
    assert c.cmd("RNFR f") == 350
    assert c.cmd("RNTO g") == 250
    assert c.cmd("RNTO h") == 503  # RNFR is used up
    for bad in ("PORT", "PORT nonsense", "PORT 1,2,3", "PORT 1,2,3,4,5,6,7", "PORT 256,0,0,1,4,1",
                "PORT 127,0,0,1,999,1", "PORT -1,0,0,1,4,1", "PORT a,b,c,d,e,f", "PORT 127.0.0.1:2000"):
        assert c.cmd(bad) == 501, bad
    assert c.cmd("EPRT |3|127.0.0.1|2000|") == 522  # RFC 2428: protocol not supported
    for bad in ("EPRT nonsense", "EPRT |1|127.0.0.1|99999|", "EPRT |1|127.0.0.1|x|",
                "EPRT |1|not-an-ip|2000|", "EPRT |1|127.0.0.1|0|", "EPRT ||||"):
        assert c.cmd(bad) == 501, bad
    assert c.cmd("RETR g") == 425  # no data connection was set up by any of that
    assert c.cmd("REST -5") == 501
    assert c.cmd("REST 99999999999999999999999") == 501
    assert c.cmd("PWD extra") == 501
    assert c.cmd("RETR") == 501
    assert c.cmd("NOOP") == 200
    c.close()


# ---------------------------------------------------------------- confinement
@pytest.fixture
def jail(node: Server) -> tuple[Server, Path]:
    """alice's home with links inside and out, and an outside folder with a secret."""
    outside = node.dir / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    home = node.home
    (home / "sub").mkdir()
    (home / "sub" / "ok.txt").write_bytes(b"ok")
    (home / "out_link").symlink_to(outside)
    (home / "file_link").symlink_to(outside / "secret.txt")
    (home / "dangling_out").symlink_to(outside / "does-not-exist")
    (home / "in_link").symlink_to(home / "sub")
    return node, outside


ESCAPES = [
    "..",
    "../..",
    "/..",
    "/../../etc/passwd",
    "sub/../../x",
    "../../../../../etc/passwd",
    "..\\..\\etc\\passwd",
    "sub\\ok.txt",
    "sub/ok.txt\x00.jpg",
    "\x00",
    "out_link",
    "out_link/secret.txt",
    "/out_link/secret.txt",
    "file_link",
    "dangling_out",
    "in_link/../out_link/secret.txt",
]
LINKS = {"out_link", "file_link", "dangling_out"}  # entries of the home that point outside
COMMANDS = ["CWD {}", "RETR {}", "SIZE {}", "MDTM {}", "LIST {}", "NLST {}", "MLST {}", "MLSD {}", "STAT {}",
            "STOR {}", "APPE {}", "STOU {}", "MKD {}/new", "RMD {}", "DELE {}", "RNFR {}", "SITE CHMOD 777 {}",
            "MFMT 20200101000000 {}"]


def test_path_escapes_refused(jail: tuple[Server, Path]) -> None:
    node, outside = jail
    before = {p.name: (p.stat().st_mode, p.read_bytes()) for p in outside.iterdir()}
    c = Raw(node)
    c.login()
    for path in ESCAPES:
        for template in COMMANDS:
            if path in LINKS and template in ("DELE {}", "RNFR {}"):
                continue  # these act on the link itself: test_symlinks_act_on_the_link
            line = template.format(path)
            code = c.cmd(line.encode("utf-8"))
            assert code == 550, (line, code)
    # The RNTO side: a valid source, an escaping target.
    (node.home / "src.txt").write_bytes(b"s")
    for path in ESCAPES:
        if path in LINKS:
            continue  # RNTO onto a link's name replaces the link (rename(2)), inside the home
        assert c.cmd("RNFR src.txt") == 350
        assert c.cmd(f"RNTO {path}".encode()) == 550, path
    assert (node.home / "src.txt").exists()
    assert {p.name: (p.stat().st_mode, p.read_bytes()) for p in outside.iterdir()} == before
    assert c.cmd("PWD") == 257
    # Links that stay inside the home work.
    assert c.cmd("CWD in_link") == 250
    assert c.cmd("SIZE ok.txt") == 213
    assert c.cmd("CWD /sub/..") == 250
    c.close()


def test_read_only_user(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    srv = server_factory(start=False)
    bob_home = tmp_path / "bob"
    bob_home.mkdir()
    (bob_home / "doc.txt").write_bytes(b"read me")
    (bob_home / "dir").mkdir()
    r = cli("user", "add", "bob", "--home", str(bob_home), "--read-only", "--password-stdin",
            config=srv.config, input="bob-pw\n")
    assert r.returncode == 0, r.stderr
    srv.start()
    pid = node_pid(srv)
    snapshot = sorted((p.name, p.stat().st_mode, p.stat().st_mtime) for p in bob_home.rglob("*"))
    c = Raw(srv)
    c.login("bob", "bob-pw")
    for line in ("STOR new.txt", "STOR doc.txt", "APPE doc.txt", "STOU", "STOU x", "DELE doc.txt", "MKD d2",
                 "XMKD d2", "RMD dir", "XRMD dir", "RNFR doc.txt", "RNTO x", "SITE CHMOD 777 doc.txt",
                 "MFMT 20200101000000 doc.txt"):
        assert c.cmd(line) == 550, line
    # Reading still works.
    assert c.cmd("SIZE doc.txt") == 213
    data = c.pasv()
    assert c.cmd("RETR doc.txt") == 150
    assert data.makefile("rb").read() == b"read me"
    data.close()
    assert c.reply()[0] == 226
    c.close()
    assert sorted((p.name, p.stat().st_mode, p.stat().st_mtime) for p in bob_home.rglob("*")) == snapshot
    assert node_pid(srv) == pid


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
        assert _closed_by_peer(data, 10), "the data connection outlived its session"
        data.close()
        assert _leftovers(node.home) == []


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (socket.timeout, TimeoutError):
        return False
    except OSError:
        return True


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
