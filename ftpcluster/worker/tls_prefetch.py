"""Fetch a session a ClientHello wants to resume before the handshake runs.

OpenSSL asks for a cached session from inside the handshake, synchronously:
a memcached round trip there would stall the whole event loop (and for the
full timeout when a server hangs). So the session-cache callbacks only read
the host's shared memory, and before a handshake starts the asyncio layer
peeks at the ClientHello on the socket (MSG_PEEK: the bytes stay for the TLS
layer), takes the ids it offers to resume, and, for an id the host cache does
not have, asks the node's memcached thread to copy it there, waiting at most
the prefetch deadline. After the deadline the handshake runs anyway and is a
full one; other sessions never wait.

Which ids: the TLS 1.3 PSK identities of 1-32 bytes (OpenSSL's stateful
tickets, issued with session tickets off, carry the session id); the legacy
session id only when the client cannot do TLS 1.3 (a TLS 1.3 client's is
random) and offers no TLS 1.2 ticket."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

MAX_HELLO = 16 * 1024 + 5
EXT_SESSION_TICKET = 35
EXT_PRE_SHARED_KEY = 41
EXT_SUPPORTED_VERSIONS = 43
TLS13 = b"\x03\x04"
RETRY_INCOMPLETE = 0.005  # a ClientHello split over segments: look again after this


class Incomplete(Exception):
    """The record holding the ClientHello has not fully arrived."""


def _vec(buf: bytes, pos: int, width: int) -> tuple[bytes, int]:
    if pos + width > len(buf):
        raise ValueError("truncated")
    n = int.from_bytes(buf[pos : pos + width], "big")
    end = pos + width + n
    if end > len(buf):
        raise ValueError("truncated")
    return buf[pos + width : end], end


def resumption_ids(data: bytes) -> list[bytes]:
    """Session ids a ClientHello (one TLS record, as read off the wire) offers to
    resume; [] for anything else. Raises Incomplete when more bytes are needed."""
    if len(data) < 5:
        raise Incomplete
    if data[0] != 22 or data[1] != 3:
        return []
    rec_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + rec_len:
        raise Incomplete
    body = data[5 : 5 + rec_len]
    try:
        if body[0] != 1:
            return []
        hs_len = int.from_bytes(body[1:4], "big")
        hello = body[4 : 4 + hs_len]  # may be cut when the hello spans records: parse what is here
        pos = 2 + 32
        legacy_id, pos = _vec(hello, pos, 1)
        _, pos = _vec(hello, pos, 2)  # cipher suites
        _, pos = _vec(hello, pos, 1)  # compression methods
        exts_raw, _ = _vec(hello, pos, 2) if pos < len(hello) else (b"", pos)
    except (ValueError, IndexError):
        return []
    tls13 = ticket = False
    psk_ids: list[bytes] = []
    p = 0
    try:
        while p + 4 <= len(exts_raw):
            etype = int.from_bytes(exts_raw[p : p + 2], "big")
            edata, p = _vec(exts_raw, p + 2, 2)
            if etype == EXT_SUPPORTED_VERSIONS:
                versions, _ = _vec(edata, 0, 1)
                tls13 = any(versions[i : i + 2] == TLS13 for i in range(0, len(versions) - 1, 2))
            elif etype == EXT_SESSION_TICKET:
                ticket = bool(edata)
            elif etype == EXT_PRE_SHARED_KEY:
                identities, _ = _vec(edata, 0, 2)
                q = 0
                while q < len(identities):
                    ident, q = _vec(identities, q, 2)
                    q += 4  # obfuscated ticket age
                    if 0 < len(ident) <= 32:
                        psk_ids.append(ident)
    except (ValueError, IndexError):
        pass
    out = list(psk_ids)
    if not tls13 and not ticket and 0 < len(legacy_id) <= 32:
        out.append(legacy_id)
    return out


async def _readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> bool:
    """Wait until `fd` is readable (True) or `timeout` passed (False); no extra task."""
    fut = loop.create_future()

    def done(ok: bool) -> None:
        if not fut.done():
            fut.set_result(ok)

    loop.add_reader(fd, done, True)
    timer = loop.call_later(timeout, done, False)
    try:
        return await fut
    finally:
        timer.cancel()
        loop.remove_reader(fd)


async def peek_ids(loop: asyncio.AbstractEventLoop, sock: socket.socket, until: float, own_fd: bool = True) -> list[bytes]:
    """The resumption ids of the ClientHello waiting on `sock`, read with MSG_PEEK;
    [] at the deadline (monotonic `until`), on EOF or on anything not a ClientHello.
    `own_fd=False` for a socket a transport owns: readiness is then watched on a
    duplicate descriptor (a loop refuses a reader on a transport's own)."""
    fd = sock.fileno() if own_fd else socket.dup(sock.fileno())
    try:
        while True:
            try:
                data = sock.recv(MAX_HELLO, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return []
            if data is not None:
                if not data:
                    return []
                try:
                    return resumption_ids(data)
                except Incomplete:
                    pass
            left = until - time.monotonic()
            if left <= 0:
                return []
            if data is None:
                if not await _readable(loop, fd, left):
                    return []
            else:  # readable but short: wait for the rest of the record
                await asyncio.sleep(min(RETRY_INCOMPLETE, left))
    finally:
        if not own_fd:
            socket.close(fd)


async def prefetch(store: Any, loop: asyncio.AbstractEventLoop, sock: Any, wait_hello: float, deadline: float,
                   own_fd: bool = True) -> str:  # fmt: skip
    """Peek (waiting up to `wait_hello` for the ClientHello), then have the store
    bring a missing session into the host cache within `deadline` seconds.
    Returns what happened: none | l1 | fetched | miss | timeout."""
    if store is None or getattr(store, "remote", None) is None or deadline <= 0:
        return "none"
    # a transport's socket object has no recv: a plain one on its descriptor (family and
    # type given, so nothing is asked of the kernel), detached afterwards
    raw = sock if isinstance(sock, socket.socket) else socket.socket(sock.family, sock.type, 0, sock.fileno())
    try:
        ids = await peek_ids(loop, raw, time.monotonic() + wait_hello, own_fd)
    finally:
        if raw is not sock:
            raw.detach()  # the descriptor stays the transport's
    if not ids:
        return "none"
    return await store.prefetch(ids, time.monotonic() + deadline)
