"""The thin asyncio layer around one `Session`: bytes to the core, replies to the
socket, actions performed and their results reported back.

One asyncio.Protocol per control connection (no StreamReader, no per-session
timers: the node sweeps timeouts once a second), which keeps an idle logged-in
session small."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ssl
import time
from typing import TYPE_CHECKING, Any

from .datachannel import DataChannel, run_transfer, send_small_now
from .datatls import ControlSessions
from .fs_port import run_off_loop
from .passive import NoPassivePort
from .protocol import (
    AbortTransfer,
    Close,
    ClosePassive,
    Event,
    EventName,
    OpenPassive,
    Output,
    Reply,
    RunBlocking,
    SessionInfo,
    SetActive,
    StartTLS,
    Transfer,
    TransferResult,
    VerifyPassword,
)
from .quickack import ack_arrivals
from .session import Session, State, User

if TYPE_CHECKING:
    from .node import NodeServer


# A passive listener kept after a small RETR (DataChannel.keep_listener) is closed by the
# first sweep after this many seconds: a client's next PASV/EPSV comes at once or not soon.
KEEP_LISTENER = 1.0


class ControlConnection(asyncio.Protocol):
    def __init__(self, node: NodeServer, client: tuple[str, int] | None, implicit_tls: bool = False,
                 info: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.node = node
        # Admitted by the node already, or None: accepted by the loop's server, and
        # connection_made asks the node (bans, limits) before any session exists.
        self.client_ip, self.client_port = client if client is not None else ("", 0)
        self.admitted = client is not None
        self.set_up_by_node = client is not None  # the node's accept loop: counted in node.connecting meanwhile
        self.implicit_tls = implicit_tls
        self.info = info or {}  # e.g. PROXY protocol details
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.data: DataChannel | None = None
        self.transfer_task: asyncio.Task[None] | None = None
        self._eof = False  # the client half-closed with work out: close once it is answered
        self.last_activity = time.monotonic()
        self.started = self.last_activity
        self.last_transfer = 0.0
        self.logged_in_at: float | None = None  # for [server] no_transfer_timeout
        self.closing = False
        self.tls_object: Any = None  # ssl.SSLObject of the control connection once TLS is on
        self.tls_sessions: ControlSessions | None = None  # the sessions its data connections may resume
        self._tls_early: list[bytes] | None = None  # set while AUTH TLS switches the transport
        self._outputs: collections.deque[Output] = collections.deque()
        self._unsent: list[bytes] = []  # replies of the outputs being performed, written together
        self._performing = False
        self._write_paused = False  # the client does not read our replies
        self._read_paused = False  # we stopped reading (client not reading, or commands backlogged)
        self._local_ip: str | None = None  # our address on this connection, once a PASV asked
        self.session_info: SessionInfo | None = None  # what event subscribers see of this session

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        node = self.node
        if not self.admitted:
            peer = transport.get_extra_info("peername")
            if not peer:  # reset before we got to it: nobody to answer
                self.closing = True
                transport.close()
                return
            ip = peer[0]
            if ip.startswith("::ffff:"):
                ip = ip[7:]
            self.client_ip, self.client_port = ip, peer[1]
            refusal = node.admit(ip)
            if refusal is not None:
                self.closing = True
                transport.write(refusal.encode("utf-8", "replace") + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
            self.admitted = True
        self.session = Session(node.session_settings(self.implicit_tls), self.client_ip, node.new_session_id())
        self.session_info = SessionInfo(self.session.session_id, self.client_ip, health_check="health_check" in self.info)
        node.session_opened(self)
        if self.implicit_tls:
            self._tls_on(transport)
        self.perform(self.session.greeting())

    def data_received(self, data: bytes) -> None:
        if b"\n" in data:  # a command: a byte now and then without one keeps no session alive
            self.last_activity = time.monotonic()
        if self._tls_early is not None:
            # A client that speaks right after its Finished: the TLS layer hands us the
            # bytes before start_tls() has returned. Keep them for the session.
            if sum(map(len, self._tls_early)) < 65536:
                self._tls_early.append(data)
            return
        if self.session is not None and not self.closing:
            self.perform(self.session.receive_data(data))

    def eof_received(self) -> bool | None:
        s = self.session
        # A half-close with work out (a password check, commands queued behind it:
        # `ncat`, `nc -N` and scripts end their input this way): answer it all, then
        # close (_close_if_eof). During a transfer only after QUIT (RFC 959: the
        # transfer completes); otherwise the client left mid-transfer: abort it.
        keep = s.quitting if s is not None and s.state is State.TRANSFER else s is not None and s.busy
        if keep and not self.closing:
            self._eof = True
            return True
        self.abort("client closed the control connection")
        return None

    def _close_if_eof(self) -> None:
        s = self.session
        if self._eof and not self.closing and (s is None or not s.busy):
            self.abort("client closed the control connection")

    def connection_lost(self, exc: Exception | None) -> None:
        task = self.transfer_task
        self.abort("control connection lost")
        if self.session is None:  # a refused connection
            return
        if task is not None and not task.done():  # its transfer's record (426, xferlog i) comes first
            task.add_done_callback(lambda _: self.node.session_closed(self))
        else:
            self.node.session_closed(self)

    def pause_writing(self) -> None:
        # The client does not read our replies: stop reading its commands too.
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flow()

    def _flow(self) -> None:
        """Read from the client only while it reads our replies and the session has room
        for its commands (pipelined commands wait in the socket, not in memory)."""
        if self.transport is None or self.closing or self._tls_early is not None or self.transport.is_closing():
            return  # during AUTH TLS the TLS switch owns reading
        backlogged = self.session is not None and self.session.backlogged
        pause = self._write_paused or backlogged
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # ------------------------------------------------------------ outputs
    def perform(self, outputs: list[Output]) -> None:
        """Write replies, publish events, start actions, in order. An action whose result
        is known at once (PASV) reports back through perform() again: those outputs go
        first (depth-first, as a nested call would) but from this loop, so a long run of
        pipelined PASV commands cannot grow the stack.

        Replies are written together, before any action that could let the client wait
        on them (one write, one segment): a small RETR sent from this callback answers
        150 and 226 in one write."""
        if self._performing:
            self._outputs.extendleft(reversed(outputs))
            return
        if len(outputs) == 1 and type(outputs[0]) is Reply:  # one reply (most commands): written at once
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(outputs[0].encode())  # type: ignore[union-attr]
        else:
            self._perform_all(outputs)
        if self._read_paused or self._write_paused or (self.session is not None and self.session.backlogged):
            self._flow()  # only when reading may have to stop or start again

    def _perform_all(self, outputs: list[Output]) -> None:
        self._performing = True
        queue = self._outputs
        queue.extend(outputs)
        unsent = self._unsent
        try:
            while queue:
                out = queue.popleft()
                kind = type(out)
                if kind is Reply:
                    unsent.append(out.encode())  # type: ignore[union-attr]
                elif kind is Event:
                    self.publish(out)  # type: ignore[arg-type]
                else:
                    self._act(out)
        finally:
            self._performing = False
            queue.clear()
            self.flush()

    def flush(self) -> None:
        """Write the replies performed so far."""
        unsent = self._unsent
        if unsent:
            data = unsent[0] if len(unsent) == 1 else b"".join(unsent)
            unsent.clear()
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)

    def _act(self, action: Any) -> None:
        """Start an action: one method per action type (a dictionary lookup, not a chain of
        isinstance checks per output)."""
        if type(action) is not Transfer:
            self.flush()  # the client may wait on a reply before this action goes on
        _ACTIONS[type(action)](self, action)

    def _act_verify(self, action: VerifyPassword) -> None:
        rec = self.node.auth.cached(action.user, action.password)
        if rec is not None:  # verified recently: answered now, no task per login
            self._verified(rec)
        else:
            self._spawn(self._verify(action))

    def _act_open_passive(self, action: OpenPassive) -> None:
        self._open_passive(action.extended)

    def _act_set_active(self, action: SetActive) -> None:
        self._channel().set_active(action.host, action.port)
        self._ticket_before_data()  # the ticket goes out with the next reply (200 to PORT/EPRT)

    def _act_close_passive(self, action: ClosePassive) -> None:
        if self.data is not None:
            self.data.close()

    def _act_transfer(self, action: Transfer) -> None:
        done, sent = send_small_now(self._channel(), action)
        if done is not None:
            self._transfer_done(done)
        else:
            self.flush()  # 150 before the data, unless it is all sent already
            self.transfer_task = self._spawn(self._transfer(action, sent))

    def _act_run_blocking(self, action: RunBlocking) -> None:
        self._spawn(self._run_blocking(action))

    def _act_abort(self, action: AbortTransfer) -> None:
        if self.transfer_task is not None:
            self.transfer_task.cancel()

    def _act_start_tls(self, action: StartTLS) -> None:
        # Stop reading now, in this callback: the ClientHello may already be on its
        # way, and must stay in the socket for the TLS layer, not reach the FTP parser.
        if self.transport is not None:
            self.transport.pause_reading()
        self._tls_early = []  # from here on, data can only come through the TLS layer
        self._spawn(self._start_tls())

    def _act_close(self, action: Close) -> None:
        self.closing = True
        if self.transfer_task is not None:
            self.transfer_task.cancel()
        if self.transport is not None:
            self.transport.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.node.loop.create_task(coro)  # not get_running_loop(): a getpid(2) each on 3.11
        self.node.track(task)
        return task

    def _report(self, outputs: list[Output]) -> None:
        if not self.closing:
            self.perform(outputs)
            self._close_if_eof()
            return
        for out in outputs:  # the session is ending: no replies, but a transfer it cut still counts
            if type(out) is Event and out.name == EventName.TRANSFER:  # its xferlog line, its bytes
                self.publish(out)

    def _channel(self) -> DataChannel:
        if self.data is None:
            self.data = DataChannel(self.node.loop, self.node.data_timeout, self.node.passive_held,
                                    self.client_ip, self.node.passive_proxy_reader)  # fmt: skip
        return self.data

    # ------------------------------------------------------------ events
    def describe(self) -> SessionInfo:
        """The session as event subscribers see it, brought up to date from the core."""
        info, s = self.session_info, self.session
        assert info is not None and s is not None
        user = s.user
        info.user = user.name if user is not None else None
        info.anonymous = bool(user is not None and user.anonymous)
        info.pending_user = s.pending_user
        info.home = s.home.root if s.home is not None else ""
        return info

    def publish(self, event: Event) -> None:
        """To the subscribers that hear it, with the session brought up to date (only
        then: most commands' events are heard by nobody)."""
        subs = self.node.route(event.name)
        if subs:
            info = self.describe()
            if event.name == EventName.LOGIN:
                info.tls_session_id = self._tls_session_id()
            self.node.deliver(subs, event, info)

    def _tls_on(self, transport: Any) -> None:
        """The control connection is TLS now (implicit, or after AUTH TLS)."""
        self.tls_object = tls = transport.get_extra_info("ssl_object")
        self.tls_sessions = ControlSessions(tls, self._remember_session) if tls is not None else None
        self.publish(Event(EventName.TLS_ESTABLISHED, {"resumed": bool(tls is not None and tls.session_reused)}))

    def _ticket_before_data(self) -> None:
        """A protected data connection comes next (ControlSessions.before_data)."""
        s = self.session
        if s is not None and s.prot_private and self.tls_sessions is not None:
            self.tls_sessions.before_data()

    def _tls_session_id(self) -> bytes | None:
        """The id of the login's session a ban would revoke (tls_revoke)."""
        try:
            return self._revocable_id(self.tls_object.session if self.tls_object is not None else None)
        except (AttributeError, ValueError):
            return None

    def _revocable_id(self, session: Any) -> bytes | None:
        """A session's id, or None where no client can resume by id: TLS 1.3 with
        stateless tickets resumes from the ticket alone, and OpenSSL gives each such
        session a dummy id of its own (remembering it cost a shared-memory and a
        memcached write per login for nothing)."""
        tls = self.tls_object
        if tls is None or session is None or (not tls.context.options & ssl.OP_NO_TICKET and tls.version() == "TLSv1.3"):
            return None
        return session.id or None

    def _remember_session(self, session: Any) -> None:
        """A session handed out after login (a fresh ticket for data connections, which
        is a cached session under `session_tickets = "off"`): on the user's list too,
        so a ban revokes it as it revokes the login's."""
        s, tls = self.session, self.node.tls
        if s is None or s.user is None or tls is None or tls.store is None:
            return
        sid = self._revocable_id(session)
        if sid:
            tls.store.remember_user(s.user.name, sid)

    # ------------------------------------------------------------ actions
    async def _verify(self, action: VerifyPassword) -> None:
        self._verified(await self.node.verify_password(action.user, action.password, self))

    def _verified(self, rec: Any) -> None:
        if self.closing:  # the client left during the check: no login (it would count in the limits)
            if rec is None and self.session is not None:  # but a wrong guess still counts (ban rules)
                for out in self.session.auth_done(None):
                    if type(out) is Event:
                        self.publish(out)
            return
        user = User(rec.name, rec.home, rec.read_only) if rec is not None else None
        if user is not None:
            self.logged_in_at = time.monotonic()
        if self.session is not None:
            self._report(self.session.auth_done(user))

    async def _run_blocking(self, action: RunBlocking) -> None:
        """A filesystem port call that can block (listing, STOU name), on a thread."""
        result = await run_off_loop(action.call)
        if self.session is not None:
            self._report(self.session.blocking_done(result))

    def _open_passive(self, extended: bool) -> None:
        s = self.session
        assert s is not None and self.transport is not None
        local = self._local_ip
        if local is None:  # asked once per session: uvloop calls getsockname each time
            local = self._local_ip = self.transport.get_extra_info("sockname")[0]
        channel = self._channel()
        channel.allowed_peers = self.node.data_peers(self)
        early = self.node.tls.data_wrapper(self.tls_sessions) if (s.prot_private and self.node.tls is not None) else None
        self._ticket_before_data()  # the ticket goes out ahead of the 227/229
        port = channel.reuse_passive(local, early)  # the one kept after the last small RETR
        if port is None:
            channel.close()  # this session's previous listener does not count against the limit
            port = self._new_passive(channel, local, early)
            if port is None:
                return
        host = self.node.masquerade or local
        if host.startswith("::ffff:"):
            host = host[7:]
        self.perform(s.passive_ready(host, port, extended))

    def _new_passive(self, channel: DataChannel, local: str, early: Any) -> int | None:
        """A new passive listener's port, or None after answering why there is none."""
        s = self.session
        assert s is not None
        node = self.node
        limit = node.cfg.server.max_passive_per_host
        if limit and node.passive_held[self.client_ip] >= limit and not (
            node.release_kept(self.client_ip) and node.passive_held[self.client_ip] < limit
        ):
            self.publish(Event(EventName.PASSIVE_LIMIT, {"held": limit}))
            self.perform(s.passive_failed(f"Can't open passive connection: {limit} passive ports already open from your address"))
            return None
        try:
            try:
                return channel.open_passive(node.passive_ports, local, early)
            except NoPassivePort:
                if not node.release_kept():
                    raise
                return channel.open_passive(node.passive_ports, local, early)
        except NoPassivePort as e:
            self.publish(Event(EventName.PASSIVE_EXHAUSTED, {}))
            self.perform(s.passive_failed(f"Can't open passive connection: {e}"))
        except OSError as e:
            self.perform(s.passive_failed(f"Can't open passive connection: {e.strerror}"))
        return None

    async def _transfer(self, t: Transfer, sent: int = 0) -> None:
        """The usual path; `sent` bytes of a small file already went (send_small_now)."""
        channel = self._channel()
        if sent:
            t = dataclasses.replace(t, offset=t.offset + sent)
        tls_wrap = self.node.tls.data_wrapper(self.tls_sessions) if (t.protected and self.node.tls is not None) else None
        if t.temp_path:
            self.node.uploads.started(t.temp_path)  # found again if this node dies mid-upload
        try:
            result = await run_transfer(channel, t, tls_wrap)
        except asyncio.CancelledError:
            result = channel.ended("aborted")
        finally:
            if t.temp_path:
                self.node.uploads.finished()
            self.transfer_task = None
        if sent:
            result = dataclasses.replace(result, bytes=result.bytes + sent)
        self._transfer_done(result)

    def _transfer_done(self, result: TransferResult) -> None:
        self.last_activity = self.last_transfer = time.monotonic()  # the idle clock starts when the transfer ends
        if self.session is not None:
            self._report(self.session.transfer_done(result))
        self.node.after_transfer(self)

    async def _start_tls(self) -> None:
        tls = self.node.tls
        assert tls is not None and self.transport is not None and self.session is not None
        loop = asyncio.get_running_loop()
        if self.session.hello_read_early:  # fail now, not after handshake_timeout
            self.publish(Event(EventName.TLS_FAILED, {"error": "ClientHello sent before the 234 reply to AUTH TLS"}))
            self.closing = True
            self.transport.abort()
            return
        sock = self.transport.get_extra_info("socket")
        left = tls.handshake_timeout
        if sock is not None and tls.prefetches:  # the ClientHello waits in the socket (reading is paused)
            left = await tls.prefetch(sock, own_fd=False)
        if self.closing or self.transport is None or self.transport.is_closing():
            return
        try:
            with ack_arrivals(loop, sock):  # the client's Finished, then its USER, may wait on our ACK (quickack.py)
                new = await loop.start_tls(self.transport, self, tls.context, server_side=True, ssl_handshake_timeout=left)
        except (OSError, asyncio.TimeoutError, ConnectionError) as e:
            self.publish(Event(EventName.TLS_FAILED, {"error": str(e) or type(e).__name__}))
            self.closing = True
            if self.transport is not None:
                self.transport.abort()
            return
        if new is None:
            return
        self.transport = new  # type: ignore[assignment]
        self._read_paused = False  # the TLS transport reads from the start
        self._tls_on(new)
        self._report(self.session.tls_done())
        early, self._tls_early = self._tls_early or [], None
        if early and not self.closing:
            self.perform(self.session.receive_data(b"".join(early)))

    # ------------------------------------------------------------ lifecycle
    def abort(self, why: str) -> None:
        """Stop everything this session does (control connection gone or ban)."""
        self.flush()  # replies performed before this (a subscriber may abort mid-perform)
        self.closing = True
        if self.transfer_task is not None:
            self.transfer_task.cancel()
        if self.data is not None:
            self.data.close()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def kick(self, code: int, text: str) -> None:
        """End the session from the server side (ban, shutdown), telling the client why."""
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(Reply(code, text).encode())
        self.abort(text)

    def check_timeouts(self, now: float, login_timeout: float, idle_timeout: float, no_transfer_timeout: float = 0.0) -> None:
        s = self.session
        if s is None or self.closing:
            return
        data = self.data
        if data is not None and self.transfer_task is None and data.passive_unused_for(now) > data.timeout:
            # PASV/EPSV and then no transfer command: give the port back (no hoarding).
            data.close()
            s.passive_expired()
        elif data is not None and data.kept_at and now - data.kept_at >= KEEP_LISTENER:
            data.close()  # kept after a small RETR, and no PASV/EPSV came for it
        elif data is not None and self.transfer_task is None:
            data.watch_strangers()
        if s.user is None and now - self.started > login_timeout:
            self.perform(s.timed_out("login"))
        elif self.transfer_task is None and idle_timeout and now - self.last_activity > idle_timeout:
            self.perform(s.timed_out("idle"))
        if s.user is not None and self.logged_in_at is None:
            self.logged_in_at = now  # logins that did not go through a password check (anonymous)
        if s.user is None or self.transfer_task is not None or not no_transfer_timeout:
            return
        if (now - max(self.last_transfer, self.logged_in_at or now) > no_transfer_timeout
                and not self.closing):  # fmt: skip
            self.perform(s.timed_out("no_transfer"))

    @property
    def user_name(self) -> str | None:
        s = self.session
        return s.user.name if s is not None and s.user is not None else None


_ACTIONS: dict[type, Any] = {
    VerifyPassword: ControlConnection._act_verify,
    OpenPassive: ControlConnection._act_open_passive,
    SetActive: ControlConnection._act_set_active,
    ClosePassive: ControlConnection._act_close_passive,
    Transfer: ControlConnection._act_transfer,
    RunBlocking: ControlConnection._act_run_blocking,
    AbortTransfer: ControlConnection._act_abort,
    StartTLS: ControlConnection._act_start_tls,
    Close: ControlConnection._act_close,
}
