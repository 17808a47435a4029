"""Native OpenSSL hooks on a standard `ssl.SSLContext`: an external session cache and
shared ticket keys (see ../shared/notes/tls.md for the measured facts).

The stdlib exposes neither `SSL_CTX_sess_set_new_cb/get_cb` nor ticket-key
control, but `_ssl` is linked against the shared libssl, so we open that very
library through `_ssl`'s own file and call them on the SSL_CTX the SSLContext
owns. The pointer is verified (options read through it must match, and must
follow a change made from Python) before anything is installed; if that fails
the caller falls back to per-process caching and says so once."""

from __future__ import annotations

import collections
import ctypes
import ssl
from typing import Callable, Protocol

SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
SSL_SESS_CACHE_SERVER = 0x2
SSL_SESS_CACHE_NO_INTERNAL = 0x300
MAX_DER = 16 * 1024
MAX_LOOKED_UP = 4096  # handshakes in flight whose looked-up session is kept (resumed_secret)
TLS1_3_VERSION = 0x0304

NEW_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
GET_CB = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_int,
                          ctypes.POINTER(ctypes.c_int))  # fmt: skip
REMOVE_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class NativeUnavailable(Exception):
    """The hooks cannot be installed on this Python/OpenSSL; the reason says why."""


class SessionBackend(Protocol):
    def lookup(self, session_id: bytes) -> bytes | None: ...
    def store(self, session_id: bytes, der: bytes, ttl: float) -> None: ...


_lib: ctypes.CDLL | None = None


def libssl() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        import _ssl

        if "OpenSSL 3." not in ssl.OPENSSL_VERSION:
            raise NativeUnavailable(f"needs OpenSSL 3, this Python runs {ssl.OPENSSL_VERSION}")
        try:
            lib = ctypes.CDLL(_ssl.__file__)
            lib.SSL_CTX_get_options.restype = ctypes.c_uint64
            lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        except (OSError, AttributeError) as e:
            raise NativeUnavailable(f"libssl symbols not reachable through _ssl ({e}); statically linked OpenSSL?") from None
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_sess_set_new_cb.argtypes = [ctypes.c_void_p, NEW_CB]
        lib.SSL_CTX_sess_set_get_cb.argtypes = [ctypes.c_void_p, GET_CB]
        lib.SSL_CTX_sess_set_remove_cb.argtypes = [ctypes.c_void_p, REMOVE_CB]
        lib.SSL_CTX_set_session_id_context.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
        lib.SSL_CTX_set_session_id_context.restype = ctypes.c_int
        lib.i2d_SSL_SESSION.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte))]
        lib.i2d_SSL_SESSION.restype = ctypes.c_int
        lib.d2i_SSL_SESSION.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte)), ctypes.c_long]
        lib.d2i_SSL_SESSION.restype = ctypes.c_void_p
        lib.SSL_SESSION_get_id.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
        lib.SSL_SESSION_get_id.restype = ctypes.POINTER(ctypes.c_ubyte)
        lib.SSL_SESSION_get_time.argtypes = [ctypes.c_void_p]
        lib.SSL_SESSION_get_time.restype = ctypes.c_long
        lib.SSL_SESSION_get_master_key.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.SSL_SESSION_get_master_key.restype = ctypes.c_size_t
        lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
        lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
        lib.SSL_new_session_ticket.argtypes = [ctypes.c_void_p]
        lib.SSL_new_session_ticket.restype = ctypes.c_int
        lib.SSL_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_get_options.restype = ctypes.c_uint64
        lib.SSL_SESSION_get_protocol_version.argtypes = [ctypes.c_void_p]
        lib.SSL_SESSION_get_protocol_version.restype = ctypes.c_int
        _lib = lib
    return _lib


def session_secret(session: ssl.SSLSession) -> bytes | None:
    """The master secret (TLS 1.2) or resumption PSK (TLS 1.3) behind a Python
    SSLSession, to tell whether two connections share one session: session ids
    cannot (empty for TLS 1.2 tickets, fresh per TLS 1.3 resumption). The
    SSL_SESSION pointer is verified through its id and time first."""
    lib = libssl()
    ptr = ctypes.c_void_p.from_address(id(session) + object.__basicsize__).value
    if not ptr:
        return None
    idlen = ctypes.c_uint(0)
    idp = lib.SSL_SESSION_get_id(ptr, ctypes.byref(idlen))
    if lib.SSL_SESSION_get_time(ptr) != session.time or ctypes.string_at(idp, idlen.value) != session.id:
        raise NativeUnavailable("SSL_SESSION pointer check failed")
    return _master_key(ptr)


def _master_key(sess: int) -> bytes | None:
    """The master secret / resumption PSK of an SSL_SESSION *."""
    buf = ctypes.create_string_buffer(256)
    n = libssl().SSL_SESSION_get_master_key(sess, buf, 256)
    return buf.raw[:n] if n else None


def ssl_pointer(obj: ssl.SSLObject) -> int:
    """The SSL * behind an ssl.SSLObject (the pointer after the socket weakref in
    _ssl's object), verified: its SSL_CTX must be the one behind `obj.context`."""
    lib = libssl()
    ptr = ctypes.c_void_p.from_address(id(obj._sslobj) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)).value
    ctx = obj.context
    want = getattr(ctx, "_ftpcluster_ptr", None)
    if want is None:
        want = ctx._ftpcluster_ptr = ctx_pointer(ctx)  # type: ignore[attr-defined]
    if not ptr or lib.SSL_get_SSL_CTX(ptr) != want:
        raise NativeUnavailable("SSL pointer check failed")
    return ptr


def new_session_ticket(obj: ssl.SSLObject) -> bool:
    """Have a TLS 1.3 server connection send one more ticket with its next write."""
    return bool(libssl().SSL_new_session_ticket(ssl_pointer(obj)) == 1)


def ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The SSL_CTX * behind `ctx`, verified through the options it reports."""
    lib = libssl()
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise NativeUnavailable("no SSL_CTX pointer in the SSLContext object")
    if lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        raise NativeUnavailable("SSL_CTX pointer check failed (options differ)")
    flip = ssl.OP_CIPHER_SERVER_PREFERENCE
    before = ctx.options
    ctx.options = before ^ flip
    try:
        ok = lib.SSL_CTX_get_options(ptr) == int(ctx.options)
    finally:
        ctx.options = before
    if not ok or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        raise NativeUnavailable("SSL_CTX pointer check failed (a change from Python did not show)")
    return ptr


def session_der(sess: int) -> tuple[bytes, bytes] | None:
    """(session id, DER) of an SSL_SESSION *."""
    lib = libssl()
    n = lib.i2d_SSL_SESSION(sess, None)
    if n <= 0 or n > MAX_DER:
        return None
    buf = (ctypes.c_ubyte * n)()
    p = ctypes.cast(buf, ctypes.POINTER(ctypes.c_ubyte))
    if lib.i2d_SSL_SESSION(sess, ctypes.byref(p)) != n:
        return None
    idlen = ctypes.c_uint(0)
    idp = lib.SSL_SESSION_get_id(sess, ctypes.byref(idlen))
    if not idp or idlen.value == 0:
        return None
    return ctypes.string_at(idp, idlen.value), bytes(buf)


def session_from_der(der: bytes) -> int | None:
    """A new SSL_SESSION * (one reference, which OpenSSL takes) or None."""
    if not der or len(der) > MAX_DER:
        return None
    buf = (ctypes.c_ubyte * len(der)).from_buffer_copy(der)
    p = ctypes.cast(buf, ctypes.POINTER(ctypes.c_ubyte))
    return libssl().d2i_SSL_SESSION(None, ctypes.byref(p), len(der)) or None


class Hooks:
    """The callbacks of one SSLContext; must live as long as the context (kept on it)."""

    def __init__(self, backend: SessionBackend, ttl: float, on_error: Callable[[BaseException], None]) -> None:
        self.backend, self.ttl, self.on_error = backend, ttl, on_error
        # SSL * -> secret of the session last looked up for it (resumed_secret)
        self.looked_up: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self.new_cb = NEW_CB(self._new)
        self.get_cb = GET_CB(self._get)
        self.remove_cb = REMOVE_CB(self._remove)

    def _new(self, ssl_ptr: int, sess: int) -> int:
        """A session to store, unless no client can ever ask for it by id: OpenSSL
        calls this for every TLS 1.3 ticket, also a stateless one, which carries
        the session itself (a control connection issues one per login and more
        for data connections: each would evict a session a client can resume)."""
        try:
            lib = libssl()
            if lib.SSL_SESSION_get_protocol_version(sess) == TLS1_3_VERSION and not lib.SSL_get_options(ssl_ptr) & ssl.OP_NO_TICKET:
                return 0
            got = session_der(sess)
            if got is not None:
                self.backend.store(got[0], got[1], self.ttl)
        except BaseException as e:  # never unwind into OpenSSL
            self.on_error(e)
        return 0  # OpenSSL keeps its reference

    def _get(self, ssl_ptr: int, id_ptr: ctypes._Pointer, id_len: int, copy: ctypes._Pointer) -> int | None:
        try:
            copy[0] = 0
            if id_len <= 0 or id_len > 64:
                return None
            der = self.backend.lookup(ctypes.string_at(id_ptr, id_len))
            sess = session_from_der(der) if der else None
            secret = _master_key(sess) if sess else None
            if secret is not None:
                self.looked_up[ssl_ptr] = secret
                self.looked_up.move_to_end(ssl_ptr)
                while len(self.looked_up) > MAX_LOOKED_UP:
                    self.looked_up.popitem(last=False)
            return sess
        except BaseException as e:
            self.on_error(e)
            return None

    def _remove(self, ctx_ptr: int, sess: int) -> None:
        # OpenSSL's own evictions and context frees (a reload) land here: the shared
        # store keeps the session for the other processes and hosts.
        return None


def resumed_secret(obj: ssl.SSLObject) -> bytes | None:
    """With stateful TLS 1.3 tickets (`session_tickets = "off"`): the secret of the
    session a resumed connection was resumed from. Its own session is already the
    ticket OpenSSL issued during the handshake, so a client that offers the session
    it resumed with again (on a data connection) would not match it. Resuming went
    through the cache lookup of this very handshake (no internal cache, no stateless
    tickets), which is what `looked_up` holds for its SSL *."""
    ctx = obj.context
    hooks = getattr(ctx, "_ftpcluster_hooks", None)
    if hooks is None or not obj.session_reused or not ctx.options & ssl.OP_NO_TICKET or obj.version() != "TLSv1.3":
        return None
    return hooks.looked_up.pop(ssl_pointer(obj), None)


def install_session_cache(ctx: ssl.SSLContext, backend: SessionBackend, ttl: float, sid_context: bytes,
                          on_error: Callable[[BaseException], None]) -> Hooks:  # fmt: skip
    """Route the server session cache of `ctx` through `backend` (no internal cache)."""
    lib = libssl()
    ptr = ctx_pointer(ctx)
    sid = sid_context[:32] or b"ftpcluster"
    if lib.SSL_CTX_set_session_id_context(ptr, sid, len(sid)) != 1:
        raise NativeUnavailable("SSL_CTX_set_session_id_context failed")
    hooks = Hooks(backend, ttl, on_error)
    lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_MODE, SSL_SESS_CACHE_SERVER | SSL_SESS_CACHE_NO_INTERNAL, None)
    lib.SSL_CTX_sess_set_new_cb(ptr, hooks.new_cb)
    lib.SSL_CTX_sess_set_get_cb(ptr, hooks.get_cb)
    lib.SSL_CTX_sess_set_remove_cb(ptr, hooks.remove_cb)
    ctx._ftpcluster_hooks = hooks  # type: ignore[attr-defined]  # keep the CFUNCTYPEs alive
    return hooks


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> None:
    """Install one 80-byte ticket key set (16 name + 32 HMAC + 32 AES), shared by every host."""
    if len(keys) != 80:
        raise ValueError("ticket keys are 80 bytes")
    buf = ctypes.create_string_buffer(keys, 80)
    if libssl().SSL_CTX_ctrl(ctx_pointer(ctx), SSL_CTRL_SET_TLSEXT_TICKET_KEYS, 80, buf) != 1:
        raise NativeUnavailable("SSL_CTRL_SET_TLSEXT_TICKET_KEYS failed")
