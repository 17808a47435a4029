"""A small plain RETR whose data connection is already accepted is sent from the
control callback (datachannel.send_small_now); when the socket buffer fills first,
it says how much went so the usual path goes on from there."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from ftpcluster.worker.datachannel import SMALL_FILE, DataChannel, send_small_now
from ftpcluster.worker.protocol import Transfer


def _channel_with(sock: socket.socket) -> tuple[asyncio.AbstractEventLoop, DataChannel]:
    loop = asyncio.new_event_loop()
    ch = DataChannel(loop, 5.0)
    fut = loop.create_future()
    fut.set_result(sock)
    ch.pending = fut  # type: ignore[assignment]
    return loop, ch


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_sent_now_and_closed(tmp_path: Path) -> None:
    data = os.urandom(1024)
    (tmp_path / "f").write_bytes(data)
    a, b = socket.socketpair()
    a.setblocking(False)
    loop, ch = _channel_with(a)
    try:
        done, sent = send_small_now(ch, Transfer("send_file", str(tmp_path / "f"), offset=24))
        assert done is not None and done.status == "ok" and done.bytes == 1000 and sent == 0
        assert ch.pending is None and a.fileno() == -1  # the data connection is closed
        assert _read_all(b) == data[24:]
        # Not for us: ASCII, TLS, rate-limited, or no connection accepted yet.
        for t in (Transfer("send_file", str(tmp_path / "f"), ascii=True), Transfer("send_file", str(tmp_path / "f"), protected=True),
                  Transfer("send_file", str(tmp_path / "f"), wrap=lambda s: s)):  # fmt: skip
            assert send_small_now(ch, t) == (None, 0)
    finally:
        b.close()
        loop.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(server side, client side) on loopback, both buffers as small as Linux allows."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        c.connect(lst.getsockname())
        a, _ = lst.accept()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
    return a, c


def test_full_buffer_hands_over_with_the_count(tmp_path: Path) -> None:
    data = os.urandom(SMALL_FILE)
    (tmp_path / "f").write_bytes(data)
    a, b = _tcp_pair()
    a.setblocking(False)
    loop, ch = _channel_with(a)
    try:
        done, sent = send_small_now(ch, Transfer("send_file", str(tmp_path / "f")))
        assert done is None and 0 < sent < len(data)
        assert ch.pending is not None and a.fileno() != -1  # the usual path goes on, same connection
        got = b""
        b.settimeout(5)
        while len(got) < sent:
            got += b.recv(65536)
        assert got == data[:sent]
    finally:
        a.close()
        b.close()
        loop.close()
