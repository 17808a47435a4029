"""Byte streams over a data connection: the plain one here, the TLS one in `datatls.py`.

Raw non-blocking sockets driven by the loop's sock_* calls and add_writer work
the same under asyncio and uvloop, and let plain RETR use os.sendfile (zero copy),
which asyncio transports cannot do under uvloop."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Protocol


class DataStream(Protocol):
    sock: socket.socket
    moved: int  # bytes moved so far; a watchdog reads it to spot a stalled transfer

    async def send_all(self, data: bytes | memoryview) -> None: ...

    async def send_file(self, fd: int, offset: int, chunk: int) -> int:
        """Send from fd at offset until EOF; return bytes sent."""
        ...

    async def recv_into(self, buf: memoryview) -> int: ...

    async def close(self, clean: bool = True) -> None: ...


class PlainStream:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.moved = 0

    async def send_all(self, data: bytes | memoryview) -> None:
        await self.loop.sock_sendall(self.sock, data)
        self.moved += len(data)

    async def _writable(self) -> None:
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self.loop.remove_writer(fd)

    async def send_file(self, fd: int, offset: int, chunk: int) -> int:
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
            if sent < chunk:
                # The socket buffer is full or the file ended; yield so others run.
                await self._writable()

    async def recv_into(self, buf: memoryview) -> int:
        n = await self.loop.sock_recv_into(self.sock, buf)
        self.moved += n
        return n

    async def close(self, clean: bool = True) -> None:
        try:
            if clean:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()
