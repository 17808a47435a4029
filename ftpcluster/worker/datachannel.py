"""A session's data connection: passive listener or active target, then one transfer.

The transfer functions stream: RETR uses sendfile for plain binary, STOR writes
each received chunk straight to disk. Uploads go to a hidden temporary name and
are renamed on success (atomic), so a failed or aborted upload leaves nothing."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import os
import socket
import ssl
import stat
import time
from typing import Any, Awaitable, Callable

from .datastream import DataStream, PlainStream, Truncated, tcp_acked, tcp_progress
from .fs import PathError
from .passive import PASSIVE_BACKLOG, PassivePorts
from .protocol import Transfer, TransferResult
from .replies import os_error_reply

CHUNK = 256 * 1024

TLSWrap = Callable[[socket.socket], Awaitable[DataStream]]
# (sock, addr) -> the real client ip from a PROXY header, or None = drop the connection
ProxyReader = Callable[[socket.socket, Any], Awaitable["str | None"]]


class DataRefused(Exception):
    """The data connection may not be used (e.g. TLS without session reuse)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def family_of(host: str) -> int:
    """The address family of a numeric address."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def same_host(a: str, b: str) -> bool:
    if a == b:
        return True  # the usual case, without parsing two addresses per data connection
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped:
        y = y.ipv4_mapped
    return x == y


class DataChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 held: collections.Counter[str] | None = None, holder: str = "",
                 proxy_reader: ProxyReader | None = None) -> None:  # fmt: skip
        self.loop = loop
        # When passive listeners expect PROXY headers (`[proxy_protocol] passive`).
        self.proxy_reader = proxy_reader
        self.timeout = timeout
        self.listener: socket.socket | None = None
        self.family = socket.AF_INET  # the listener's
        self.listening_since = 0.0  # monotonic time the passive listener opened
        self.port = 0  # the passive listener's
        # A plain listener kept after a small RETR for the session's next PASV/EPSV (socket,
        # bind, listen and close saved), since when; 0.0: none kept. See keep_listener().
        self.kept_at = 0.0
        # Passive listeners open per client address on this node (`held[holder]`), so one
        # address cannot hold the whole passive range.
        self.held = held
        self.holder = holder
        self.active: tuple[str, int] | None = None
        self.foreign_rejected = 0
        # Who may connect to the passive port: the control client, or (no PROXY on data) the balancer.
        self.allowed_peers: tuple[str, ...] = ()
        # The early accept of a passive connection (TLS wrapped at once, or a PROXY header to
        # read first), or a connection accepted_now() took: a task or a done future.
        self.pending: asyncio.Future[Any] | None = None
        self.stream: DataStream | None = None  # the running transfer's (ended())
        self.started = 0.0
        self.tally = 0  # what the last transfer's stream had moved when it was closed

    def ended(self, status: Any, code: int = 0, message: str = "") -> TransferResult:
        """The result of the transfer run_transfer is running or ran last, ended early
        (426, ABOR, a limit, a stop): with the bytes it moved and its time."""
        moved = _tally(self.stream) if self.stream is not None else self.tally
        return TransferResult(status, bytes=moved, message=message, code=code, seconds=time.monotonic() - self.started)

    def open_passive(self, ports: PassivePorts, bind_host: str, early_wrap: TLSWrap | None = None) -> int:
        """Listen, and accept (and, under PROT P, start TLS) as soon as the client
        connects, not only once RETR/STOR arrives: clients such as curl send their
        ClientHello right away and wait for our answer before reading the control
        channel again (a 200 ms stall per transfer otherwise)."""
        self.close()
        self.family = family = family_of(bind_host)
        self.listener = ports.open(bind_host, family)
        self.listening_since = time.monotonic()
        self.port = ports.last_port
        if self.held is not None:
            self.held[self.holder] += 1
        if early_wrap is not None or self.proxy_reader is not None:
            # TLS: clients such as curl send their ClientHello as soon as they connect and
            # wait for our answer; a PROXY header is read first.
            self.pending = self.loop.create_task(self._accept_early(early_wrap))
        # Plain: the connection waits in the listener's queue until the transfer command
        # takes it (accepted_now), with no watcher on the listener (six system calls). A
        # listener still unused at the node's next sweep gets one (watch_strangers).
        return ports.last_port  # the port it just bound (no getsockname call)

    def watch_strangers(self) -> None:
        """A plain listener waited a sweep for its transfer command: accept from now on,
        so connections from strangers are closed and cannot fill its queue before the
        owner's (as TLS listeners do from the start)."""
        if self.listener is not None and self.pending is None and not self.kept_at:
            self.pending = self.loop.create_task(self._accept_early(None))

    def keep_listener(self) -> None:
        """The transfer is over: close all but a plain passive listener, which the
        session's next PASV/EPSV takes again (reuse_passive) if it comes before the
        node's next sweep closes it (KEEP_LISTENER)."""
        if self.listener is None or self.proxy_reader is not None or self.pending is not None:
            self.close()
            return
        self.active = None
        self.kept_at = time.monotonic()

    def reuse_passive(self, bind_host: str, early_wrap: TLSWrap | None) -> int | None:
        """The kept listener's port for a new plain PASV/EPSV, its queue emptied first
        (connections nobody is waiting on); None when there is none to take."""
        listener = self.listener
        if not self.kept_at or listener is None or early_wrap is not None or family_of(bind_host) != self.family:
            return None
        for _ in range(PASSIVE_BACKLOG + 1):  # what the queue holds at most
            try:
                fd, _addr = listener._accept()  # type: ignore[attr-defined]
            except OSError:
                break
            os.close(fd)
        self.kept_at = 0.0
        self.listening_since = time.monotonic()
        return self.port

    async def _accept_early(self, wrap: TLSWrap | None) -> "socket.socket | DataStream":
        sock = await self._accept()
        if wrap is None:
            return sock
        return await wrap(sock)  # closes the socket itself when the handshake fails

    def set_active(self, host: str, port: int) -> None:
        self.close()
        self.active = (host, port)

    def close(self) -> None:
        self.kept_at = 0.0
        if self.pending is not None:
            pending, self.pending = self.pending, None
            if pending.done():
                if not pending.cancelled() and pending.exception() is None:
                    _discard(pending.result())  # accepted, never used (a second PASV)
            else:
                pending.cancel()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self.held is not None:
                self.held[self.holder] -= 1
                if self.held[self.holder] <= 0:
                    del self.held[self.holder]
        self.active = None

    def passive_unused_for(self, now: float) -> float:
        """Seconds a passive listener (or its early-accepted connection) has waited for a
        transfer command; 0 when there is none."""
        if self.listener is None and self.pending is None:
            return 0.0
        return now - self.listening_since

    async def connect(self) -> "socket.socket | DataStream":
        """The data socket (or TLS stream, when it was wrapped early), from the
        passive listener or by connecting out."""
        pending = self.pending
        if pending is not None and pending.done() and not pending.cancelled() and pending.exception() is None:
            self.pending = None  # accepted early (the usual case): no timeout to arm
            self.close()
            return pending.result()  # type: ignore[no-any-return]
        try:
            async with asyncio.timeout(self.timeout):
                if self.pending is not None:
                    got = await self.pending
                    self.pending = None
                    return got
                if self.listener is not None:
                    return await self._accept()
                if self.active is not None:
                    host, port = self.active
                    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
                    sock.setblocking(False)
                    try:
                        await self.loop.sock_connect(sock, (host, port))
                    except BaseException:
                        sock.close()
                        raise
                    _no_delay(sock)
                    return sock
        finally:
            self.close()
        raise ConnectionError("no data connection was set up")

    async def _accept(self) -> socket.socket:
        assert self.listener is not None
        while True:
            sock, addr = await self.loop.sock_accept(self.listener)
            peer: str | None = addr[0]
            if self.proxy_reader is not None:
                sock.setblocking(False)
                try:
                    peer = await self.proxy_reader(sock, addr)
                except BaseException:  # timeout or ABOR while the header was awaited
                    sock.close()
                    raise
            if peer is not None and (not self.allowed_peers or any(same_host(peer, p) for p in self.allowed_peers)):
                sock.setblocking(False)
                _no_delay(sock)
                return sock
            # Data-connection theft attempt, or a port scan: someone else raced to the
            # port. Close theirs and keep waiting for the owner (until data_timeout):
            # giving up after N strangers would let anyone abort someone else's transfer.
            self.foreign_rejected += 1
            sock.close()


def _discard(got: Any) -> None:
    sock = getattr(got, "sock", got)
    with contextlib.suppress(OSError):
        sock.close()


def _no_delay(sock: socket.socket) -> None:
    """A TLS handshake or a short listing is several small writes: without this,
    Nagle and the peer's delayed ACK stall each one by up to 200 ms."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ------------------------------------------------------------------ transfers
def _to_crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def _send_file(stream: DataStream, t: Transfer) -> int:
    if not t.ascii and isinstance(stream, PlainStream):
        # A bare descriptor: open() would add fstat, ioctl (isatty) and lseek calls.
        fd = os.open(t.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return await stream.send_file(fd, t.offset, CHUNK)
        finally:
            os.close(fd)
    with open(t.path, "rb") as f:
        f.seek(t.offset)
        total = 0
        pending_cr = False
        while True:
            data = f.read(CHUNK)
            if not data:
                return total
            if t.ascii:
                if pending_cr:
                    data = b"\r" + data
                pending_cr = data.endswith(b"\r")
                if pending_cr:
                    data = data[:-1]
                data = _to_crlf(data)
            await stream.send_all(data)
            total += len(data)


async def _send_lines(stream: DataStream, t: Transfer) -> int:
    total = 0
    assert t.lines is not None
    for chunk in t.lines:
        await stream.send_all(chunk)
        total += len(chunk)
    return total


def _open_for_upload(t: Transfer) -> int:
    """The file an upload writes. O_NONBLOCK: opening a FIFO someone put in a home
    for writing would block the event loop until a reader came (the node's heartbeat
    then goes stale and the supervisor kills it); anything but a regular file is
    refused (550), as the core refuses it before the 150 (a race could swap one in)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    if t.temp_path:
        return os.open(t.temp_path, flags | os.O_EXCL, 0o644)
    if t.exclusive:
        return os.open(t.path, flags | os.O_EXCL, 0o644)
    try:
        fd = os.open(t.path, flags | (os.O_APPEND if t.append else 0), 0o644)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO with no reader
            raise PathError("Not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PathError("Not a regular file")
    os.set_blocking(fd, True)
    if not t.append:
        # REST n STOR: keep the first n bytes, write from there; what lies past the
        # new end is cut when the upload ends (_receive_file), not now, so a refused
        # upload can give the file back its size (QuotaGuard._refuse).
        os.lseek(fd, t.offset, os.SEEK_SET)
    return fd


async def _receive_file(stream: DataStream, t: Transfer) -> int:
    fd = _open_for_upload(t)
    done = refused = False
    total = 0
    try:
        receive_to = getattr(stream, "receive_to_fd", None)
        if not t.ascii and receive_to is not None:
            got = await receive_to(fd)
            if got is not None:  # None: no thread free, do it on the loop
                done = True
                return got
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        pending_cr = False
        while True:
            n = await stream.recv_into(view)
            if n == 0:
                if pending_cr:
                    os.write(fd, b"\r")
                break
            total += n
            if t.ascii:
                data = bytes(view[:n])
                if pending_cr:
                    data = b"\r" + data
                pending_cr = data.endswith(b"\r")
                if pending_cr:
                    data = data[:-1]
                _write_all(fd, data.replace(b"\r\n", b"\n"))
            else:
                _write_all(fd, view[:n])
        done = True
    except DataRefused:
        refused = True  # a limit cut it: the guard already put the file back
        raise
    finally:
        if t.offset and not (t.append or t.temp_path or refused):
            with contextlib.suppress(OSError):  # REST n STOR: the file ends where the data did
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))
        os.close(fd)
        if t.temp_path:
            if done:
                os.replace(t.temp_path, t.path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(t.temp_path)
    return total


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_RUNNERS = {"send_file": _send_file, "send_lines": _send_lines, "receive_file": _receive_file}


SMALL_FILE = 16 * 1024  # at most what a fresh socket's send buffer takes at once


def _accepted_now(channel: DataChannel) -> socket.socket | None:
    """The plain data connection if it is there already: accepted early (TLS, PROXY:
    not plain, so None), taken before, or waiting in the listener's queue (the usual
    case: the client connected before it sent RETR). What this takes becomes
    `channel.pending`, a done future, so the usual path finds it too. The socket is
    left without TCP_NODELAY: sendfile then close needs none (the FIN pushes)."""
    pending = channel.pending
    if pending is not None:
        if not pending.done() or pending.cancelled() or pending.exception() is not None:
            return None
        got = pending.result()
        return got if isinstance(got, socket.socket) else None
    listener = channel.listener
    if listener is None or channel.proxy_reader is not None:
        return None
    try:
        # listener.accept() without its Python layer (two enum conversions of the
        # listener's family and type per call)
        fd, addr = listener._accept()  # type: ignore[attr-defined]
    except OSError:  # BlockingIOError: not connected yet
        return None
    sock = socket.socket(channel.family, socket.SOCK_STREAM, 0, fd)
    if channel.allowed_peers and not any(same_host(addr[0], p) for p in channel.allowed_peers):
        channel.foreign_rejected += 1
        sock.close()
        return None
    sock.setblocking(False)
    fut: asyncio.Future[socket.socket] = channel.loop.create_future()
    fut.set_result(sock)
    channel.pending = fut
    return sock


def send_small_now(channel: DataChannel, t: Transfer) -> tuple[TransferResult | None, int]:
    """A small plain binary RETR whose data connection is already accepted (the
    usual case: clients connect before they send RETR), sent from the control
    callback itself: no task, no watchdog (it cannot stall), no loop round trip.
    Returns (result, 0) when done, or (None, bytes already sent) for the usual
    path to go on from there (not eligible: 0; the socket buffer filled: more)."""
    if t.kind != "send_file" or t.ascii or t.protected or t.wrap is not None:
        return None, 0
    sock = _accepted_now(channel)
    if sock is None:
        return None, 0
    started = time.monotonic()
    try:
        fd = os.open(t.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, 0  # the usual path reports it
    sent = 0
    try:
        size = os.fstat(fd).st_size - t.offset
        if size > SMALL_FILE:
            return None, 0
        out = sock.fileno()
        while sent < size:
            n = os.sendfile(out, fd, t.offset + sent, SMALL_FILE)
            if n == 0:
                break  # shorter than fstat said (truncated meanwhile)
            sent += n
    except BlockingIOError:
        return None, sent  # the rest goes the usual way, on the same connection
    except OSError:
        if not sent:
            return None, 0
        channel.pending = None
        channel.close()
        _discard(sock)
        return TransferResult("failed", code=426, message="Data connection closed; transfer aborted"), 0
    finally:
        os.close(fd)
    channel.pending = None
    channel.keep_listener()
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()
    return TransferResult("ok", bytes=sent, seconds=time.monotonic() - started), 0


async def run_transfer(channel: DataChannel, t: Transfer, tls_wrap: TLSWrap | None) -> TransferResult:
    """Connect, move the data, close. Never raises except CancelledError (ABOR; then
    `channel.ended()` says what moved). A transfer that fails still reports the bytes
    it moved and its time (xferlog `i` lines, the byte counters)."""
    started = channel.started = time.monotonic()
    channel.stream, channel.tally = None, 0
    try:
        got = await channel.connect()
    except DataRefused as e:
        return TransferResult("refused", code=e.code, message=str(e))
    except (OSError, TimeoutError, ConnectionError) as e:
        return TransferResult("no_connection", message=f"Can't open data connection: {str(e) or 'timeout'}")
    stream: DataStream | None = None if isinstance(got, socket.socket) else got
    sock = got if isinstance(got, socket.socket) else got.sock
    try:
        if stream is not None and not t.protected:
            return TransferResult("refused", code=425, message="Protection level changed after PASV; use PASV again")
        if t.protected and stream is None:
            if tls_wrap is None:
                return TransferResult("refused", code=534, message="TLS is not available for data connections")
            stream = await tls_wrap(sock)
        elif stream is None:
            stream = PlainStream(sock, channel.loop)
        if t.wrap is not None:
            stream = t.wrap(stream)
        channel.stream = stream
        moved = await _watch(_RUNNERS[t.kind](stream, t), stream, channel.timeout)
        await stream.close(clean=True)
        stream = None
        return TransferResult("ok", bytes=moved, seconds=time.monotonic() - started)
    except DataRefused as e:
        return channel.ended("refused", e.code, str(e))
    except PathError as e:
        return channel.ended("failed", 550, str(e))
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        return channel.ended("failed", 426, "Data connection timed out; transfer aborted")
    except OSError as e:
        # A TLS record layer error mid-transfer (the client dropped or truncated the
        # data connection) is the same 426 as a reset plain connection.
        if isinstance(e, Truncated):
            return channel.ended("failed", 426, "TLS data connection closed without close_notify: "
                                 "the upload may be truncated; transfer aborted")  # fmt: skip
        if isinstance(e, (ConnectionError, BrokenPipeError, ssl.SSLError)) or e.errno is None:
            return channel.ended("failed", 426, "Data connection closed; transfer aborted")
        return channel.ended("failed", *os_error_reply(e))
    finally:
        if stream is not None:
            channel.tally, channel.stream = _tally(stream), None  # for an ABOR's result, after this
            await stream.close(clean=False)
        elif not sock._closed:  # type: ignore[attr-defined]
            sock.close()


def _tally(stream: DataStream) -> int:
    """Bytes a stream moved. For a plain download the kernel's count of what the peer
    acknowledged says more than `moved` while a blocking sendfile of a big file runs
    in a thread: that counts its block only when the call returns."""
    n = stream.moved
    if isinstance(stream, PlainStream):
        n = max(n, tcp_acked(stream.sock))
    return n


async def _watch(work: Awaitable[int], stream: DataStream, timeout: float) -> int:
    """Run `work`, failing with TimeoutError when no byte moves for `timeout` seconds.
    A byte moved is one our side sent or received (`stream.moved`) or one the kernel
    saw acknowledged or arrive (`tcp_progress`): a slow reader is never cut off while
    it keeps reading, even during a long blocking sendfile call. `work` runs in this
    task; a timer looks at the progress every `timeout`/4 (at most 1 s) and cancels
    the task when none came for `timeout` (no task, no wait(), no asyncio.timeout
    per transfer: a small RETR is over long before the first look)."""
    loop = stream.loop if isinstance(stream, PlainStream) else asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    period = min(timeout / 4, 1.0)
    last = stream.moved + tcp_progress(stream.sock)
    last_at = loop.time()
    expired = False

    def check() -> None:
        nonlocal last, last_at, handle, expired
        now = stream.moved + tcp_progress(stream.sock)
        if now != last:
            last, last_at = now, loop.time()
        elif loop.time() - last_at >= timeout:
            expired = True
            task.cancel()
            return
        handle = loop.call_later(period, check)

    handle = loop.call_later(period, check)
    try:
        return await work
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise TimeoutError from None  # ours, not an ABOR or a stop
        raise
    finally:
        handle.cancel()
