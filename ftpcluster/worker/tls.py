"""TLS for the control and data channels, on the standard `ssl` module (see README).

`TLSService` owns the server SSLContext of a node: certificate, protocol floor,
the session cache (host shared memory, later memcached behind it) and ticket
keys (per process, or derived from the cluster key so every host agrees).
`reload()` builds a new context; connections already up keep the old one.
`data_wrapper` gives the coroutine that turns a data socket into a TLS stream
that must resume the control connection's session."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from typing import Any, Callable

import structlog

from ..cluster.session_seal import SealError, derive, load_sealer
from ..cluster.tls_cache import open_cache
from ..cluster.tls_store import TwoLevelStore
from ..config import Config
from .datatls import ControlSessions, TLSStream, wrap_data
from .protocol import Event, EventName, SessionInfo, listens
from .tls_native import NativeUnavailable, ctx_pointer, install_session_cache
from .tls_prefetch import prefetch as prefetch_session
from .tls_tickets import install_ticket_keys

log = structlog.get_logger("ftpcluster.tls")
trace = structlog.get_logger("ftpcluster.trace.tls")

# TLS 1.2 suites: forward secret AEAD only (TLS 1.3 suites are all fine).
CIPHERS_12 = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
TICKET_PERIOD = 3600.0
# Drawn once in the supervisor (which imports this module before it forks), so
# every node of a host seals tickets alike under `session_tickets = "local"`.
HOST_TICKET_SECRET = os.urandom(32)
Counter = Callable[[str, tuple[str, ...]], None]


def build_context(cfg: Config) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cfg.resolve(cfg.tls.certificate), cfg.resolve(cfg.tls.private_key))
    if cfg.tls.session_tickets == "off":
        # TLS 1.3 then issues stateful tickets whose identity is a session id in the cache.
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


def probe_mode(cfg: Config) -> dict[str, Any]:
    """What a node will run with, checked in the supervisor for `status` and metrics:
    the native hooks need a verifiable SSL_CTX pointer and the key file for cluster modes."""
    out: dict[str, Any] = {"enabled": cfg.tls.enabled}
    if not cfg.tls.enabled:
        return out
    reason = None
    try:
        ctx_pointer(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    except NativeUnavailable as e:
        reason = str(e)
    cache = "internal"
    if reason is None and cfg.tls.session_cache in ("local", "memcache"):
        cache = "shm+memcache" if cfg.tls.session_cache == "memcache" and cfg.memcache.enabled else "shm"
    tickets = cfg.tls.session_tickets
    if tickets == "cluster" and reason is not None:
        tickets = "local"
    out.update({"session_cache": cache, "session_tickets": tickets, "native_hooks": reason is None, "fallback_reason": reason})
    return out


class TLSService:
    def __init__(self, cfg: Config, count: Counter | None = None, memcache: Callable[[], Any] | None = None) -> None:
        self.count: Counter = count or (lambda name, labels: None)
        self.memcache = memcache  # gives the node's MemcacheThread (made on first use)
        self.handshake_timeout = cfg.tls.handshake_timeout
        self.store: Any = None  # TwoLevelStore: host shared memory, then memcached
        self.cache_mode = "internal"  # what actually serves session ids: internal | shm
        self.ticket_mode = cfg.tls.session_tickets
        self.warnings: list[str] = []
        self.cfg = cfg
        self.context, self.data_context = self._build(cfg)

    # ------------------------------------------------------------ contexts
    def _build(self, cfg: Config) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """(control, data) contexts alike but for tickets: the control connection
        issues one TLS 1.3 ticket after its handshake (and one more before a data
        connection once the last was used: datatls.ControlSessions); data connections
        issue none (a client that uploads and closes without reading one resets)."""
        pair = build_context(cfg), build_context(cfg)
        for ctx in pair:
            if cfg.tls.session_cache in ("local", "memcache"):
                self._install_cache(ctx, cfg)
            if cfg.tls.session_tickets != "off":
                self._install_tickets(ctx, cfg)
        pair[0].num_tickets, pair[1].num_tickets = 1, 0
        return pair

    def _warn(self, what: str, reason: str) -> None:
        msg = f"{what} unavailable, falling back to per-process state: {reason}"
        if msg not in self.warnings:
            self.warnings.append(msg)
            log.warning("tls_fallback", what=what, reason=reason)

    def _on_error(self, e: BaseException) -> None:
        self.count("ftpcluster_tls_session_cache_total", ("L1", "error"))
        trace.debug("session_cache_error", error=repr(e))

    def _install_cache(self, ctx: ssl.SSLContext, cfg: Config) -> None:
        try:
            if self.store is None:
                self.store = self._make_store(cfg, open_cache(cfg))
            sid = (cfg.tls.session_context or cfg.memcache.namespace).encode()[:32]
            install_session_cache(ctx, self.store, cfg.tls.session_lifetime, sid, self._on_error)
            self.cache_mode = "shm+memcache" if self.store.remote is not None else "shm"
        except (NativeUnavailable, OSError, ValueError) as e:
            self._warn("shared TLS session cache", str(e))

    def _make_store(self, cfg: Config, l1: Any) -> Any:
        sealer = None
        if cfg.tls.session_cache == "memcache" and cfg.memcache.enabled:
            try:
                sealer = load_sealer(cfg.resolve(cfg.tls.session_key_file), cfg.tls.session_key_overlap)
            except SealError as e:
                self._warn("memcached TLS session store", str(e))
        remote = self.memcache() if (sealer is not None and self.memcache is not None) else None
        return TwoLevelStore(cfg, l1, sealer, self.count, remote)

    def _install_tickets(self, ctx: ssl.SSLContext, cfg: Config) -> None:
        try:
            # local: the host secret every node inherited from the supervisor
            secret = HOST_TICKET_SECRET
            if cfg.tls.session_tickets == "cluster" and self.ticket_mode == "cluster":
                secret = load_sealer(cfg.resolve(cfg.tls.session_key_file)).secret
            install_ticket_keys(ctx, lambda epoch: derive(secret, "tickets", epoch, 80), TICKET_PERIOD, self._on_error)
        except (SealError, NativeUnavailable, OSError) as e:
            self.ticket_mode = "local"
            self._warn("cluster session tickets", str(e))

    def reload(self, cfg: Config) -> None:
        """New certificate/key/settings for new connections; raises (and keeps the
        current context) when the new files do not load."""
        ctx, data_ctx = self._build(cfg)
        self.cfg, self.handshake_timeout = cfg, cfg.tls.handshake_timeout
        self.context, self.data_context = ctx, data_ctx

    # ------------------------------------------------------------ before a handshake
    @property
    def prefetches(self) -> bool:
        """Is there a memcached level to prefetch from? (Asked before making the
        coroutine: without memcached a login's handshake needs none.)"""
        return self.store is not None and self.store.remote is not None

    async def prefetch(self, sock: Any, own_fd: bool = True) -> float:
        """Bring the session the waiting ClientHello wants to resume from memcached into
        the host cache, without blocking the loop and for at most `[memcache] timeout`
        (then the handshake is a full one). Nothing to do without memcached. Returns
        what is left of the handshake timeout (the wait for the ClientHello counts)."""
        store = self.store
        if not self.prefetches:
            return self.handshake_timeout
        t0 = time.monotonic()
        try:
            got = await prefetch_session(store, asyncio.get_running_loop(), sock, self.handshake_timeout,
                                 self.cfg.memcache.timeout, own_fd)  # fmt: skip
        except (OSError, ValueError) as e:
            trace.debug("session_prefetch_failed", error=repr(e))
            got = "none"
        if got not in ("none", "l1"):
            trace.debug("session_prefetch", result=got)
        return max(0.1, self.handshake_timeout - (time.monotonic() - t0))

    # ------------------------------------------------------------ data channels
    def data_wrapper(self, control: ControlSessions | None) -> Callable[[socket.socket], Any]:
        """For a data connection of the session whose control connection's TLS
        sessions are `control`: the session to resume is one of those."""
        context, require = self.data_context, self.cfg.tls.require_data_session_reuse
        close_notify = self.cfg.tls.upload_close_notify
        loop = asyncio.get_running_loop()

        def counted(reused: bool) -> None:
            self.count("ftpcluster_tls_handshakes_total", ("resumed" if reused else "full",))

        async def wrap(sock: socket.socket) -> TLSStream:
            left = await self.prefetch(sock)
            return await wrap_data(sock, context, control, require, left, loop, counted, close_notify)

        return wrap

    @listens(EventName.LOGIN)
    def remember_login(self, event: Event, info: SessionInfo | None) -> None:
        """Subscriber: a TLS login's session id, kept so a ban on the user can revoke it."""
        if event.name != EventName.LOGIN or info is None or self.store is None or not info.tls_session_id:
            return
        self.store.remember_user(str(event.fields.get("user", "")), info.tls_session_id)

    def flush_counts(self) -> None:
        """What the memcached thread counted (L2 stores, rejected sealed sessions) into
        the metrics; the store publishes them at its next lookup too."""
        if self.store is not None:
            self.store.flush_counts()

    def status(self) -> dict[str, Any]:
        return {"session_cache": self.cache_mode, "session_tickets": self.ticket_mode, "warnings": list(self.warnings)}
