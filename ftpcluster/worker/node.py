"""A worker node: one process, one event loop, many sessions on inherited listeners.

The supervisor binds the listeners and forks; `run_node` is what the child runs.
Plain FTP connections are accepted by the event loop's own server (no Python
per accept: the cheapest login), and a banned client is refused when its
connection is made, before any session exists. Implicit TLS and PROXY protocol
listeners are accepted here in batches (add_reader + accept), so a ban is
checked before a TLS handshake, and a PROXY header can be read from the raw
socket before TLS starts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import itertools
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Collection

import structlog

from ..cluster.memcache_thread import MemcacheThread
from ..config import LISTEN_BACKLOG, Config
from ..descriptors import sessions_within, soft_limit
from ..logs import reopen
from ..users import Authenticator, UserRecord, load_users
from .control import ControlConnection
from .full_node import FullNode, RoomElsewhere
from .loops import new_event_loop
from .passive import PassivePorts
from .quickack import ack_arrivals
from .protocol import Event, EventName, SessionInfo, Subscriber, hears
from .services import NodeServices, build_services
from .session import SessionSettings
from .upload_journal import UploadJournal
from .users_watch import watch_users

log = structlog.get_logger("ftpcluster.worker")

ACCEPT_BATCH = 64
FAST_STOP_CLEANUP = 2.0  # seconds transfers cancelled by a fast stop get to clean up
_CONNECT, _DISCONNECT = Event(EventName.CONNECT, {}), Event(EventName.DISCONNECT, {})  # no fields: shared


@dataclass
class NodeContext:
    """What the supervisor hands a node at fork time."""

    node_id: int
    config: Config
    control_sock: socket.socket
    implicit_tls_sock: socket.socket | None = None
    passive_range: tuple[int, int] | None = None  # this node's slice; None = the whole range
    heartbeat: Callable[[dict[str, Any]], None] | None = None  # called about once a second
    parent_fd: int | None = None  # read end of a pipe; EOF = the supervisor died
    slot: int = 0  # this node's row in the host's shared tables (node table, metrics)
    room_elsewhere: RoomElsewhere | None = None  # (cap) -> another node has room (full_node.py)


class NodeServer:
    """Accepts, keeps the sessions and their timers, and hands events to its services
    (`NodeServices`, built here once; see services.py)."""

    def __init__(self, ctx: NodeContext, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.cfg = cfg = ctx.config
        self.loop = loop
        self.node_id = ctx.node_id
        self.slot = ctx.slot
        self.sessions: set[ControlConnection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="auth")
        self._inflight: dict[bytes, asyncio.Future[Any]] = {}
        low, high = ctx.passive_range or cfg.passive_range
        self.passive_ports = PassivePorts(low, high)
        self.passive_held: collections.Counter[str] = collections.Counter()  # client ip -> open passive listeners
        self.uploads = UploadJournal(cfg.state_dir / "uploads")
        self.masquerade = cfg.server.masquerade_address
        self.data_timeout = cfg.server.data_timeout
        self.stopping = False
        self.draining = False  # reload/scale-down: no new sessions, current ones may go on
        self.stopped = asyncio.Event()
        self.sessions_total = 0
        self.rejected_total = 0
        # Accepted connections that are not sessions yet (implicit-TLS handshake, PROXY
        # header): they hold memory like sessions, so they count against the node's limit.
        self.connecting = 0
        self.handshaking: collections.Counter[str] = collections.Counter()  # client ip -> implicit-TLS handshakes
        self._ids = itertools.count(1)
        self._pid = os.getpid()  # for session ids: the node is made after the fork
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._server: asyncio.AbstractServer | None = None  # the loop's server on the plain listener
        self.full = FullNode(ctx.room_elsewhere, self._pause_listening, self._resume_listening, self._publish_row)
        # Sessions admitted at most: max_sessions_per_node, or fewer when the descriptor
        # limit would run out first (then a client gets 421, not a silent close from
        # the event loop's accept out of descriptors).
        fits = sessions_within(soft_limit())
        self.session_cap = cfg.server.max_sessions_per_node if fits is None else min(cfg.server.max_sessions_per_node, fits)
        self._memcache: MemcacheThread | None = None
        self._memcache_lock = threading.Lock()
        self.auth = Authenticator({})
        self.reload_users()
        self.services = NodeServices()  # nothing counts before the metrics row exists
        self.services = svc = build_services(self, self._count)
        self.tls = svc.tls
        self.subscribers = svc.subscribers()
        self._routes: dict[str, tuple[Subscriber, ...]] = {}  # event name -> who hears it (route())
        self.admission = svc.admission()
        self.user_gates = svc.user_gates()  # checked at PASS: bans, per-host/user limits
        self.passive_proxy_reader = svc.passive_proxy_reader()
        self._settings = {False: self._make_settings(False), True: self._make_settings(True)}

    # ------------------------------------------------------------ set-up
    def reload_users(self) -> None:
        self.auth = Authenticator(load_users(self.cfg.resolve(self.cfg.server.users_file)))

    @property
    def open_sessions(self) -> Collection[ControlConnection]:
        return self.sessions

    def memcache(self) -> Any:
        """The node's memcached thread (TLS sessions, cluster ban counts) and its health
        checker (transfer limits' own thread uses it too), made on first use from any
        thread: no memcached call of the node runs on the loop."""
        with self._memcache_lock:
            if self._memcache is None:
                loop = self.loop
                self._memcache = MemcacheThread(self.cfg, count=lambda n, l: loop.call_soon_threadsafe(self._count, n, l))
                self._memcache.start()
        return self._memcache

    def _count(self, name: str, labels: tuple[str, ...]) -> None:
        metrics = self.services.metrics
        if metrics is not None:
            metrics.inc(name, labels)

    def _make_settings(self, implicit: bool) -> SessionSettings:
        s = self.cfg.server
        return SessionSettings(
            banner=s.banner,
            max_login_attempts=s.max_login_attempts,
            max_line=s.max_line_length,
            anonymous_root=str(self.cfg.resolve(s.anonymous_root)) if s.anonymous_root else "",
            atomic_uploads=s.atomic_uploads,
            tls_available=self.tls is not None,
            tls_required=self.cfg.tls.required if self.tls is not None else "off",
            implicit_tls=implicit,
            user_gate=self.user_gate,
            limits=self.services.transfer_limits,
            on_command=self.services.command_counter(),
            heard=self.heard,
        )

    def user_gate(self, user: str, ip: str) -> str | None:
        for gate in self.user_gates:
            refusal = gate(user, ip)
            if refusal is not None:
                return refusal
        return None

    def session_settings(self, implicit_tls: bool) -> SessionSettings:
        return self._settings[implicit_tls]

    def new_session_id(self) -> str:
        return f"{self.node_id}-{self._pid}-{next(self._ids)}"

    # ------------------------------------------------------------ accepting
    async def start_accepting(self) -> None:
        self._listeners = []
        if self.services.proxy is not None:
            self._listeners.append((self.ctx.control_sock, False))  # a PROXY header comes first
        if self.ctx.implicit_tls_sock is not None and self.tls is not None:
            self._listeners.append((self.ctx.implicit_tls_sock, True))
        for sock, _ in self._listeners:
            sock.setblocking(False)
        await self._listen()

    async def _listen(self) -> None:
        if self.services.proxy is None:
            # The loop accepts (C, no Python per connection); connection_made refuses bans.
            # It listens again with the supervisor's backlog. It gets a duplicate of the
            # shared listener, which closing the server closes: stop_accepting() (and a
            # full node's pause) closes only this process's descriptor in use.
            sock = self.ctx.control_sock
            try:
                dup = socket.socket(sock.family, sock.type, sock.proto, os.dup(sock.fileno()))
                server = await self.loop.create_server(lambda: ControlConnection(self, None), sock=dup, backlog=LISTEN_BACKLOG)
            except OSError as e:  # out of descriptors, say: try again at the next tick
                log.warning("cannot listen again", error=e.strerror or str(e))
                self.full.listen_failed()
                return
            if self.stopping or self.full.paused or self._server is not None:
                server.close()  # stopped or full again while it was being made
            else:
                self._server = server
        if self.stopping or self.full.paused:
            return
        for sock, implicit in self._listeners:
            # Our own accept loop: a banned client is refused before a TLS handshake or a
            # PROXY header read, with no transport or protocol object at all.
            self.loop.add_reader(sock.fileno(), self._on_acceptable, sock, implicit)

    def _pause_listening(self) -> None:
        """Full, and a sibling has room (full_node.py): leave the queue to the others."""
        for sock, _ in self._listeners:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(sock.fileno())
        if self._server is not None:
            server, self._server = self._server, None
            server.close()

    def _resume_listening(self) -> None:
        if not self.stopping:
            self.track(self.loop.create_task(self._listen()))

    def _publish_row(self) -> None:
        """The node table row now: siblings see this node fill up or have room at once."""
        if self.ctx.heartbeat is not None:
            with contextlib.suppress(Exception):
                self.ctx.heartbeat(self.stats())

    def _in_use(self) -> int:
        return len(self.sessions) + self.connecting

    def stop_accepting(self) -> None:
        self._pause_listening()
        self._listeners = []

    def admit(self, ip: str) -> str | None:
        """A refusal for a connection the loop accepted (bans, limits, a full node), or
        None; refusals are counted as _refuse() counts them."""
        msg = self.refusal_for(ip)
        if msg is None and self._in_use() >= self.session_cap:
            msg = "421 Too many connections on this node, try again later"
            self.full.refused(self.session_cap)
        if msg is None and self.stopping and not self.draining:  # accepted just before the stop
            msg = "421 Server shutting down"
        if msg is not None:
            self.rejected_total += 1
        return msg

    def _on_acceptable(self, listener: socket.socket, implicit: bool) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the ones we have
                log.warning("accept failed", error=e.strerror)
                return
            self._admit(sock, addr, implicit)
            if self.full.paused:
                return  # full: the rest of the queue is for the nodes with room

    def refusal_for(self, ip: str) -> str | None:
        for check in self.admission:
            msg = check(ip)
            if msg is not None:
                return msg
        return None

    def _admit(self, sock: socket.socket, addr: tuple[Any, ...], implicit: bool) -> None:
        ip = addr[0]
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        msg = self.admit(ip)
        if msg is not None:
            self._refuse(sock, msg, counted=True)
            return
        sock.setblocking(False)  # TCP_NODELAY and SO_OOBINLINE (ABOR's urgent byte) come from the listener
        self.connecting += 1
        self.full.changed(self._in_use(), self.session_cap)
        self.track(self.loop.create_task(self._connect(sock, (ip, addr[1]), implicit)))

    def _refuse(self, sock: socket.socket, msg: str, counted: bool = False) -> None:
        """Cheap path: no protocol object, no TLS, no log line; counted instead."""
        self.rejected_total += not counted
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(msg.encode("utf-8", "replace") + b"\r\n")
        sock.close()

    async def _connect(self, sock: socket.socket, client: tuple[str, int], implicit: bool) -> None:
        try:
            await self._connect_counted(sock, client, implicit)
        finally:
            self.connecting -= 1
            self.full.changed(self._in_use(), self.session_cap)
            if self.stopping:
                self._stop_when_idle()  # maybe the last accepted connection, refused or failed

    async def _connect_counted(self, sock: socket.socket, client: tuple[str, int], implicit: bool) -> None:
        info: dict[str, Any] = {}
        proxy = self.services.proxy
        if proxy is not None:
            got = await proxy.control_hook(sock, client)
            if got is None:
                sock.close()
                return
            real_ip, (client, info) = client[0], got
            if client[0] != real_ip:  # bans were checked on the balancer's address; now on the client's
                msg = self.refusal_for(client[0])
                if msg is not None:
                    self._refuse(sock, msg)
                    return
        ip = client[0]
        limit = self.cfg.tls.max_handshakes_per_host
        if implicit and limit and self.handshaking[ip] >= limit:
            self._refuse(sock, "421 Too many TLS handshakes from your address, try again later")
            return
        try:
            if implicit:
                self.handshaking[ip] += 1
                try:
                    left = await self.tls.prefetch(sock)
                    with ack_arrivals(self.loop, sock):  # the client's Finished may wait on it (see quickack.py)
                        await self.loop.connect_accepted_socket(
                            lambda: ControlConnection(self, client, True, info),
                            sock,
                            ssl=self.tls.context,
                            ssl_handshake_timeout=left,
                        )
                finally:
                    self.handshaking[ip] -= 1
                    if self.handshaking[ip] <= 0:
                        del self.handshaking[ip]
            else:
                await self.loop.connect_accepted_socket(lambda: ControlConnection(self, client, False, info), sock)
        except (OSError, asyncio.TimeoutError, ConnectionError) as e:
            self.publish_raw(EventName.TLS_FAILED if implicit else EventName.CONNECT_FAILED, client[0],
                             error=str(e) or type(e).__name__)  # fmt: skip
            sock.close()

    # ------------------------------------------------------------ session bookkeeping
    def session_opened(self, conn: ControlConnection) -> None:
        self.sessions.add(conn)
        self.sessions_total += 1
        conn.publish(_CONNECT)
        if not conn.set_up_by_node:  # else counted in `connecting` until _connect ends
            self.full.changed(self._in_use(), self.session_cap)

    def session_closed(self, conn: ControlConnection) -> None:
        if conn in self.sessions:
            self.sessions.discard(conn)
            conn.publish(_DISCONNECT)
            self.full.changed(self._in_use(), self.session_cap)
        if self.stopping:
            self._stop_when_idle()

    def _stop_when_idle(self) -> None:
        """Stopped once nothing is left, checked one loop turn later (_stop_if_idle): a
        connection the loop's server accepted before stop_accepting() has its
        connection_made() queued before the check, so it is served (draining) or told
        421 (stopping), never cut."""
        self.loop.call_soon(self._stop_if_idle)

    def _stop_if_idle(self) -> None:
        if self.stopping and not self.sessions and not (self.draining and self.connecting):
            self.stopped.set()

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def route(self, name: str) -> tuple[Subscriber, ...]:
        """The subscribers that hear events called `name`, in the services' order;
        worked out on the first such event (logging is configured by then)."""
        subs = self._routes.get(name)
        if subs is None:
            subs = self._routes[name] = tuple(s for s in self.subscribers if hears(s, name))
        return subs

    def heard(self, name: str) -> bool:
        """Does any subscriber hear events called `name` (SessionSettings.heard)?"""
        return bool(self.route(name))

    def publish(self, event: Event, info: SessionInfo | None) -> None:
        self.deliver(self.route(event.name), event, info)

    def deliver(self, subs: tuple[Subscriber, ...], event: Event, info: SessionInfo | None) -> None:
        for sub in subs:
            try:
                sub(event, info)
            except Exception:  # a listener must never take a session down
                log.exception("event subscriber failed", event_name=event.name)

    def publish_raw(self, name: str, ip: str, **fields: Any) -> None:
        """An event outside any session (e.g. a TLS handshake that failed at accept)."""
        fields["ip"] = ip
        for sub in self.route(name):
            with contextlib.suppress(Exception):
                sub(Event(name, fields), None)

    def release_kept(self, client_ip: str | None = None) -> int:
        """Close the passive listeners sessions keep after a small RETR (of `client_ip`'s
        sessions, or everyone's): a PASV about to be refused for the per-host limit or
        for want of a free port takes precedence over a reuse that may never come."""
        released = 0
        for conn in self.sessions:
            data = conn.data
            if data is not None and data.kept_at and (client_ip is None or conn.client_ip == client_ip):
                data.close()
                released += 1
        return released

    def data_peers(self, conn: ControlConnection) -> tuple[str, ...]:
        """Who may open this session's passive data connection."""
        peers = [conn.client_ip]
        proxy_peer = conn.info.get("proxy_peer")
        if proxy_peer and not self.cfg.proxy_protocol.passive:
            peers.append(proxy_peer)
        return tuple(peers)

    async def verify_password(self, user: str, password: str, conn: ControlConnection) -> UserRecord | None:
        """A recent success is answered on the loop; a real hash check runs in the pool,
        and concurrent identical logins (a cold-start herd) share one check."""
        auth = self.auth
        rec = auth.cached(user, password)
        if rec is not None:
            return rec
        key = auth.flight_key(user, password)
        fut = self._inflight.get(key)
        if fut is None:
            fut = self.loop.run_in_executor(self.executor, auth.verify, user, password)
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    # ------------------------------------------------------------ timers and shutdown
    async def housekeeping(self) -> None:
        s = self.cfg.server
        while not self.stopped.is_set():
            now = time.monotonic()
            for conn in list(self.sessions):
                conn.check_timeouts(now, s.login_timeout, s.idle_timeout, s.no_transfer_timeout)
            if self.ctx.heartbeat is not None:
                with contextlib.suppress(Exception):
                    self.ctx.heartbeat(self.stats())
            self.full.tick(self._in_use(), self.session_cap)
            if self.tls is not None:
                self.tls.flush_counts()  # the memcached thread's counts, also on an idle node
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), 1.0)

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "in_use": self._in_use(),
            "sessions_total": self.sessions_total,
            "rejected_total": self.rejected_total,
            "stopping": self.stopping,
        }

    def graceful_stop(self) -> None:
        """Stop accepting; idle sessions are told and closed, transfers may finish."""
        if self.stopping and not self.draining:
            return
        self.stopping, self.draining = True, False
        self.stop_accepting()
        for conn in list(self.sessions):
            if conn.transfer_task is None:
                conn.kick(421, "Server shutting down")
        self._stop_when_idle()

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): reopen the log file and every service's own (xferlog)."""
        reopen()
        with contextlib.suppress(Exception):
            self.services.reopen_logs()

    def drain(self) -> None:
        """Reload or scale-down (SIGUSR2): accept nothing new, let every session end on its
        own, and after `graceful_timeout` stop the stragglers as a graceful stop would."""
        if self.stopping:
            return
        self.stopping = self.draining = True
        self.stop_accepting()
        self._stop_when_idle()  # accepted ones still connecting are served too
        self.loop.call_later(self.cfg.server.graceful_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        if self.draining:
            self.graceful_stop()

    def fast_stop(self) -> None:
        """Stop now (SIGQUIT, or a graceful stop past its deadline): every session gets
        421; running transfers are cancelled and given a moment to end as an abort
        does (the partial upload removed, the xferlog `i` line written) before the
        node exits."""
        self.stopping = True
        self.stop_accepting()
        transfers = [c.transfer_task for c in self.sessions if c.transfer_task is not None]
        for conn in list(self.sessions):
            conn.kick(421, "Server shutting down")
        if not transfers:
            self.stopped.set()
            return
        waited = asyncio.ensure_future(asyncio.wait(transfers, timeout=FAST_STOP_CLEANUP), loop=self.loop)
        waited.add_done_callback(lambda _: self.stopped.set())

    def after_transfer(self, conn: ControlConnection) -> None:
        if self.stopping and not self.draining:
            conn.kick(421, "Server shutting down")


def _watch_parent(loop: asyncio.AbstractEventLoop, fd: int, server: NodeServer) -> None:
    """The supervisor holds the write end; EOF means it died: leave at once, no orphans."""

    def on_readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            server.fast_stop()

    os.set_blocking(fd, False)
    loop.add_reader(fd, on_readable)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Linux prctl(PR_SET_PDEATHSIG): the kernel signals us when the supervisor dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)


async def serve(ctx: NodeContext) -> int:
    loop = asyncio.get_running_loop()
    server = NodeServer(ctx, loop)
    server.services.start(server)
    loop.add_signal_handler(signal.SIGTERM, server.graceful_stop)
    loop.add_signal_handler(signal.SIGINT, server.fast_stop)
    loop.add_signal_handler(signal.SIGQUIT, server.fast_stop)
    loop.add_signal_handler(signal.SIGUSR2, server.drain)
    loop.add_signal_handler(signal.SIGUSR1, server.reopen_logs)
    if ctx.parent_fd is not None:
        _watch_parent(loop, ctx.parent_fd, server)
    server.track(loop.create_task(watch_users(server)))
    server.uploads.open()  # removes temporary upload files of nodes that died
    await server.start_accepting()
    log.debug("node accepting", node=ctx.node_id, pid=os.getpid())
    await server.housekeeping()
    for conn in list(server.sessions):
        conn.abort("node stopping")
    for task in list(server.tasks):
        task.cancel()
    await asyncio.sleep(0)
    server.executor.shutdown(wait=False, cancel_futures=True)
    server.uploads.close()
    return 0


def run_node(ctx: NodeContext, use_uvloop: bool | None = None) -> int:
    """Run a node until it is told to stop; returns the exit status."""
    loop = new_event_loop(use_uvloop)
    try:
        return loop.run_until_complete(serve(ctx))
    finally:
        with contextlib.suppress(Exception):
            loop.close()
