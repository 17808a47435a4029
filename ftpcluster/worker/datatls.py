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
import collections
import contextlib
import socket
import ssl
from typing import Any, Callable

from .datachannel import DataRefused
from .datastream import Fair, Truncated
from .quickack import ack_now
from .tls_native import NativeUnavailable, new_session_ticket, resumed_secret, session_secret


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


KEEP_SESSIONS = 4  # sessions of one control connection its data connections may resume


class ControlSessions:
    """The TLS sessions one control connection handed its client: the ones its
    protected data connections may resume (not merely some session of this server,
    e.g. an attacker's own), compared by master secret / resumption PSK.

    OpenSSL clients that keep a client-side session cache (curl) use a TLS 1.3 ticket
    once, so the control connection's one ticket served the first data connection
    and the next offered none (a full handshake: 522). Once a data connection has
    resumed the newest session, the next PASV/EPSV/PORT/EPRT issues one more ticket
    on the control connection, which the client reads before that reply. The login's
    session and the last KEEP_SESSIONS stay good, for clients that keep resuming the
    one they saved at login, or an older one now and then."""

    __slots__ = ("tls", "on_new", "first", "secrets", "spent")

    def __init__(self, control_tls: Any, on_new: Callable[[Any], None] | None = None) -> None:
        self.tls = control_tls  # the control connection's ssl.SSLObject
        self.on_new = on_new  # called with each session seen for the first time (a ban must revoke it too)
        # the session before any fresh ticket; with stateful TLS 1.3 tickets, the one the login resumed from
        self.first: bytes | None = None
        with contextlib.suppress(NativeUnavailable, AttributeError, ValueError, OSError):
            self.first = resumed_secret(control_tls)
        self.secrets: collections.deque[bytes] = collections.deque(maxlen=KEEP_SESSIONS)
        self.spent = False  # a data connection resumed the newest session

    def _newest(self) -> bytes | None:
        session = self.tls.session
        secret = session_secret(session) if session is not None else None
        if secret is not None and secret not in self.secrets:
            self.secrets.append(secret)
            if self.first is None:
                self.first = secret
            if self.on_new is not None:
                with contextlib.suppress(Exception):  # best effort: never a reason to refuse the data connection
                    self.on_new(session)
        return secret

    def resumed_by(self, data: ssl.SSLSocket) -> bool:
        try:
            newest = self._newest()
            theirs = data.session
            secret = session_secret(theirs) if theirs is not None else None
        except (AttributeError, ValueError, ssl.SSLError, OSError):
            return False
        except NativeUnavailable:
            return True  # cannot bind on this build: resumption alone is required
        if secret is None:
            return False
        if secret == newest:
            self.spent = True
        return secret == self.first or secret in self.secrets

    def before_data(self) -> None:
        """A protected data connection comes next: one more ticket if the newest was used."""
        if not self.spent:
            return
        self.spent = False
        try:
            if self.tls.version() == "TLSv1.3":
                new_session_ticket(self.tls)
        except (NativeUnavailable, AttributeError, ValueError, OSError):
            pass


async def wrap_data(
    sock: socket.socket,
    context: ssl.SSLContext,
    control: ControlSessions | None,
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
        if not reused or control is None or not control.resumed_by(sslsock):
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
