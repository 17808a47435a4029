"""TLS data connections (PROT P): an `SSLSocket` on the raw non-blocking socket,
driven by the loop's reader/writer callbacks.

An SSLSocket does its record I/O in C straight on the socket (no MemoryBIO
copies), which matters for 256 MB transfers; waiting on readiness with
add_reader/add_writer works the same under asyncio and uvloop.

The handshake result is checked against the control connection: by default a
data connection must resume the control connection's TLS session (RFC 4217
section 10.2 style protection against data-connection theft, as vsftpd and
ProFTPD do by default)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any, Callable

from .datachannel import DataRefused
from .datastream import Fair, Truncated
from .quickack import ack_now
from .tls_native import NativeUnavailable, session_secret


class TLSStream(Fair):
    def __init__(self, sslsock: ssl.SSLSocket, loop: asyncio.AbstractEventLoop, close_notify: bool = True) -> None:
        self.sock = sslsock
        self.loop = loop
        self.moved = 0
        self._fd = sslsock.fileno()
        self.close_notify = close_notify  # the end of received data needs the peer's close_notify

    async def _wait(self, write: bool) -> None:
        fut = self.loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if write:
            self.loop.add_writer(self._fd, ready)
        else:
            self.loop.add_reader(self._fd, ready)
        try:
            await fut
        finally:
            if write:
                self.loop.remove_writer(self._fd)
            else:
                self.loop.remove_reader(self._fd)

    async def _retry(self, op: Callable[[], Any], quickack: bool = False) -> Any:
        while True:
            try:
                return op()
            except ssl.SSLWantReadError:
                if quickack:
                    ack_now(self.sock)
                await self._wait(write=False)
            except ssl.SSLWantWriteError:
                await self._wait(write=True)

    async def handshake(self) -> None:
        # Mid-handshake, after our flight: a client that writes its TLS 1.3 CCS and
        # Finished apart (GnuTLS: lftp) holds the Finished until the CCS is ACKed.
        await self._retry(self.sock.do_handshake, quickack=True)
        # The client speaks last (its Finished: TLS 1.2 resumed, and TLS 1.3 since data
        # connections issue no ticket), then writes its data (STOR): with Nagle on, that
        # waits for our ACK. Once is enough: we never write on an upload, so Linux then
        # ACKs each small record (and close_notify) as we read it. See quickack.py.
        ack_now(self.sock)

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = await self._retry(lambda: self.sock.send(view))
            view = view[n:]
            self.moved += n
            await self.fair(n)

    async def send_file(self, fd: int, offset: int, chunk: int) -> int:
        raise NotImplementedError("TLS data goes through send_all")

    async def recv_into(self, buf: memoryview) -> int:
        """0 at the end of the data: the client's close_notify (OpenSSL reads it as a
        clean end). A TCP close or reset without it (SSLEOFError, the socket being
        wrapped with suppress_ragged_eofs off) is where a network or an attacker cut
        the upload short: Truncated (426, nothing kept), unless [tls]
        upload_close_notify = false takes it as the end (curl, lftp and ftplib all
        send close_notify)."""
        try:
            n = await self._retry(lambda: self.sock.recv_into(buf))
        except ssl.SSLZeroReturnError:
            n = 0
        except (ssl.SSLEOFError, ConnectionResetError):
            if self.close_notify:
                raise Truncated("the upload ended without TLS close_notify") from None
            n = 0
        self.moved += n
        await self.fair(n)
        return n

    async def close(self, clean: bool = True) -> None:
        # Always send close_notify: OpenSSL drops a session from its cache when a
        # connection ends without it, which would break the next data connection.
        with contextlib.suppress(OSError, ValueError, ssl.SSLError):
            self.sock.unwrap() if clean else self.sock._sslobj.shutdown()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            self.sock.close()


def same_session(control_tls: Any, data: ssl.SSLSocket) -> bool:
    """Whether the data connection resumed the control connection's own session
    (not merely some session of this server, e.g. an attacker's own)."""
    try:
        a, b = control_tls.session, data.session
        if a is None or b is None:
            return False
        sa, sb = session_secret(a), session_secret(b)
    except (AttributeError, ValueError, ssl.SSLError, OSError):
        return False
    except NativeUnavailable:
        return True  # cannot bind on this build: resumption alone is required
    return sa is not None and sa == sb


async def wrap_data(
    sock: socket.socket,
    context: ssl.SSLContext,
    control_tls: Any,
    require_reuse: bool,
    timeout: float,
    loop: asyncio.AbstractEventLoop,
    on_handshake: Callable[[bool], None] | None = None,
    close_notify: bool = True,
) -> TLSStream:
    """Handshake on an accepted/connected data socket; raise DataRefused (522) when
    the client did not resume its control connection's TLS session."""
    sslsock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False)
    stream = TLSStream(sslsock, loop, close_notify)
    try:
        async with asyncio.timeout(timeout):
            await stream.handshake()
    except (TimeoutError, ssl.SSLError, OSError) as e:
        await stream.close(clean=False)
        raise DataRefused(522, f"TLS handshake on the data connection failed: {_reason(e)}") from None
    except BaseException:
        await stream.close(clean=False)
        raise
    reused = sslsock.session_reused
    if on_handshake is not None:
        on_handshake(reused)
    if require_reuse:
        if not reused or control_tls is None or not same_session(control_tls, sslsock):
            await stream.close(clean=True)
            raise DataRefused(
                522, "Data connection must resume the TLS session of the control connection (TLS session reuse required)"
            )
    return stream


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    return str(e) or type(e).__name__
