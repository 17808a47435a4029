"""Byte streams over a data connection: the plain one here, the TLS one in `datatls.py`.

Raw non-blocking sockets driven by the loop's sock_* calls and add_writer work
the same under asyncio and uvloop, and let plain RETR use os.sendfile (zero copy),
which asyncio transports cannot do under uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol


class DataStream(Protocol):
    sock: socket.socket
    moved: int  # bytes moved so far; a watchdog reads it to spot a stalled transfer

    async def send_all(self, data: bytes | memoryview) -> None: ...

    async def send_file(self, fd: int, offset: int, chunk: int) -> int:
        """Send from fd at offset until EOF; return bytes sent."""
        ...

    async def recv_into(self, buf: memoryview) -> int: ...

    async def close(self, clean: bool = True) -> None: ...


# Files at least this big are sent from a thread, in sendfile calls of BLOCK bytes.
# The environment variables let a test send a small file down the threaded path in
# several calls (a slow reader of a big file is slow).
THREAD_MIN = int(os.environ.get("FTPCLUSTER_SENDFILE_THREAD_MIN", 8 << 20))
THREADS = 8  # concurrent threaded sends per node; more use the event loop
BLOCK = int(os.environ.get("FTPCLUSTER_SENDFILE_BLOCK", 16 << 20))
RECV_BLOCK = 1 << 20
_threads_busy = 0
_executor: ThreadPoolExecutor | None = None


class Truncated(ConnectionError):
    """A protected upload ended without the client's close_notify (datatls.py): 426,
    and nothing kept, as for a reset connection."""


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="sendfile")
    return _executor


def _splice_to_file(sock_fd: int, fd: int, stop: threading.Event, stream: Any) -> int:
    """socket -> pipe -> file with splice(2): the bytes never enter user space."""
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, 1031, RECV_BLOCK)  # F_SETPIPE_SZ
        total = 0
        while not stop.is_set():
            try:
                n = os.splice(sock_fd, w, RECV_BLOCK)
            except (BlockingIOError, InterruptedError):
                continue
            if stream.before_write is not None:
                stream.before_write(n)  # a quota: the piece is still in the pipe
            if n == 0:
                return total
            left = n
            while left:
                left -= os.splice(r, fd, left)
            total += n
            stream.moved += n
        raise ConnectionAbortedError("upload stopped")
    finally:
        os.close(r)
        os.close(w)


def tcp_progress(sock: socket.socket) -> int:
    """Bytes the peer has acknowledged plus bytes received, as the kernel counts them
    (Linux TCP_INFO tcpi_bytes_acked + tcpi_bytes_received); 0 where unavailable.

    What a slow reader drains from our socket buffer shows here at once, while
    `moved` only changes when a send call returns: a blocking sendfile of a whole
    block, or a non-blocking one waiting for a third of a multi-megabyte autotuned
    buffer to empty, can take minutes at 64 KB/s with the data flowing all along."""
    acked, received = _tcp_counts(sock)
    return acked + received


def tcp_acked(sock: socket.socket) -> int:
    """Data bytes the peer has acknowledged (our SYN counts one in the kernel's sum)."""
    return max(0, _tcp_counts(sock)[0] - 1)


def _tcp_counts(sock: socket.socket) -> tuple[int, int]:
    """(tcpi_bytes_acked, tcpi_bytes_received); zeros where unavailable."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError):
        return 0, 0
    if len(info) < _TCP_INFO_LEN:
        return 0, 0
    acked, received = struct.unpack_from("=QQ", info, 120)
    return int(acked), int(received)


_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCP_INFO_LEN = 136  # up to tcpi_bytes_received (Linux >= 4.1)


FAIR_SHARE = 256 << 10  # bytes a stream moves on the loop before it lets other sessions run


class Fair:
    """Take turns on the event loop. A read or write that finds the socket ready
    returns without suspending, so a fast client of a transfer on the loop (TLS
    data, ASCII, an upload when the threads are busy) would otherwise keep it for
    the whole file: other sessions of the node stalled 150-560 ms behind a PROT P
    upload. Every FAIR_SHARE bytes the stream yields once (about a millisecond)."""

    _unfair = 0

    async def fair(self, n: int) -> None:
        self._unfair += n
        if self._unfair >= FAIR_SHARE:
            self._unfair = 0
            await asyncio.sleep(0)


class PlainStream(Fair):
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.moved = 0
        # receive_to_fd calls it from its thread with each piece before writing it (0: the
        # end); it raises to refuse the piece (quotas, worker/throttle.py)
        self.before_write: Callable[[int], None] | None = None

    async def send_all(self, data: bytes | memoryview) -> None:
        await self.loop.sock_sendall(self.sock, data)
        self.moved += len(data)
        await self.fair(len(data))

    async def _writable(self) -> None:
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self.loop.remove_writer(fd)

    async def send_file(self, fd: int, offset: int, chunk: int) -> int:
        global _threads_busy
        size = os.fstat(fd).st_size
        if size - offset >= THREAD_MIN and _threads_busy < THREADS:
            _threads_busy += 1
            try:
                return await self._send_file_thread(fd, offset)
            finally:
                _threads_busy -= 1
        sent_total = 0
        out = self.sock.fileno()
        while True:
            try:
                sent = os.sendfile(out, fd, offset, chunk)
            except BlockingIOError:
                await self._writable()
                continue
            if sent == 0:
                return sent_total
            offset += sent
            sent_total += sent
            self.moved += sent
            if offset >= size:
                # At the end fstat saw: ask again at once (0 = done, the usual case)
                # instead of first waiting for the socket to drain. A small file costs
                # two sendfile calls and no epoll round trip.
                size = offset
                continue
            if sent < chunk:
                # The socket buffer is full or the file ended; yield so others run.
                await self._writable()

    async def _send_file_thread(self, fd: int, offset: int, count: int | None = None) -> int:
        """A big file (or `count` bytes of it): one blocking sendfile loop in a thread,
        the way a C server does it, instead of a loop wake-up per socket buffer. A 1 s
        send timeout lets the thread notice an abort; ABOR also shuts the socket down to
        wake it at once."""
        stop = threading.Event()
        out = self.sock.fileno()
        limit = count if count is not None else 1 << 62

        def work() -> int:
            total = 0
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 0))
            os.set_blocking(out, True)
            try:
                while total < limit and not stop.is_set():
                    try:
                        n = os.sendfile(out, fd, offset + total, min(BLOCK, limit - total))
                    except (BlockingIOError, InterruptedError):
                        continue  # the send timeout: look at `stop`, then go on
                    if n == 0:
                        break
                    total += n
                    self.moved += n
            finally:
                os.set_blocking(out, False)
            return total

        return await self._in_thread(work, stop)

    async def receive_to_fd(self, fd: int) -> int | None:
        """A binary upload: blocking recv + write in a thread (a 1 s receive timeout
        lets it notice an abort). None when every thread is busy."""
        global _threads_busy
        if _threads_busy >= THREADS:
            return None
        stop = threading.Event()
        out = self.sock.fileno()

        def work() -> int:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 1, 0))
            os.set_blocking(out, True)
            try:
                if hasattr(os, "splice") and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:  # splice refuses O_APPEND
                    return _splice_to_file(out, fd, stop, self)
                buf = bytearray(RECV_BLOCK)
                view = memoryview(buf)
                total = 0
                while not stop.is_set():
                    try:
                        n = self.sock.recv_into(view)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if self.before_write is not None:
                        self.before_write(n)
                    if n == 0:
                        return total
                    chunk = view[:n]
                    while chunk:
                        chunk = chunk[os.write(fd, chunk) :]
                    total += n
                    self.moved += n
            finally:
                os.set_blocking(out, False)
            raise ConnectionAbortedError("upload stopped")

        _threads_busy += 1
        try:
            return await self._in_thread(work, stop)
        finally:
            _threads_busy -= 1

    async def _in_thread(self, work: Any, stop: threading.Event) -> Any:
        fut = self.loop.run_in_executor(_pool(), work)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(BaseException):
                await fut  # the file must stay open until the thread lets go of it
            raise

    async def recv_into(self, buf: memoryview) -> int:
        n = await self.loop.sock_recv_into(self.sock, buf)
        self.moved += n
        await self.fair(n)
        return n

    async def close(self, clean: bool = True) -> None:
        try:
            if clean:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()
