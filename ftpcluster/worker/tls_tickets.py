"""Cluster-wide TLS session tickets: every host derives the same ticket keys from the
cluster secret and a time epoch, so a ticket issued anywhere resumes everywhere with
no lookup at all.

A ring: the current epoch's key seals new tickets; the two previous epochs (and
the next one, for clock skew between hosts) still open; a ticket under an older
key is accepted and re-issued under the current one (callback returns 2).
Installed with SSL_CTX_set_tlsext_ticket_key_evp_cb (OpenSSL 3 signature, with an
EVP_MAC_CTX for the HMAC)."""

from __future__ import annotations

import ctypes
import os
import ssl
import time
from typing import Callable

from .tls_native import NativeUnavailable, ctx_pointer, libssl

TICKET_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.POINTER(ctypes.c_ubyte),
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)  # fmt: skip
OSSL_PARAM_UTF8_STRING = 4
OSSL_PARAM_OCTET_STRING = 5
OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value


class OSSL_PARAM(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", ctypes.c_void_p),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]  # fmt: skip


KeyFn = Callable[[int], bytes]  # epoch -> 80 bytes: 16 name, 32 HMAC, 32 AES


class TicketKeys:
    """The callback and its key ring for one SSLContext (kept alive on the context)."""

    def __init__(self, derive: KeyFn, period: float, on_error: Callable[[BaseException], None]) -> None:
        self.derive, self.period, self.on_error = derive, max(60.0, period), on_error
        self._cache: dict[int, tuple[bytes, bytes, bytes, ctypes.Array, ctypes.Array]] = {}
        self.cb = TICKET_CB(self._callback)
        lib = libssl()
        lib.EVP_aes_256_cbc.restype = ctypes.c_void_p
        lib.EVP_EncryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        lib.EVP_DecryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        lib.EVP_MAC_CTX_set_params.argtypes = [ctypes.c_void_p, ctypes.POINTER(OSSL_PARAM)]
        self.lib = lib
        self.cipher = lib.EVP_aes_256_cbc()
        self.issued = self.resumed = self.renewed = self.unknown = 0

    def epoch(self, now: float | None = None) -> int:
        return int((time.time() if now is None else now) // self.period)

    def _key(self, epoch: int) -> tuple[bytes, bytes, bytes, ctypes.Array, ctypes.Array]:
        k = self._cache.get(epoch)
        if k is None:
            raw = self.derive(epoch)
            if len(raw) != 80:
                raise ValueError("ticket key material must be 80 bytes")
            name, hmac_key, aes_key = raw[:16], raw[16:48], raw[48:]
            params = (OSSL_PARAM * 3)()
            hk = ctypes.create_string_buffer(hmac_key, 32)
            digest = ctypes.create_string_buffer(b"SHA256")
            params[0] = OSSL_PARAM(b"key", OSSL_PARAM_OCTET_STRING, ctypes.cast(hk, ctypes.c_void_p), 32, OSSL_PARAM_UNMODIFIED)
            params[1] = OSSL_PARAM(b"digest", OSSL_PARAM_UTF8_STRING, ctypes.cast(digest, ctypes.c_void_p), 6, OSSL_PARAM_UNMODIFIED)
            params[2] = OSSL_PARAM(None, 0, None, 0, 0)
            k = (name, hmac_key, aes_key, params, (hk, digest))  # type: ignore[assignment]
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[epoch] = k  # type: ignore[assignment]
        return k  # type: ignore[return-value]

    def _callback(self, ssl_ptr: int, key_name: ctypes._Pointer, iv: ctypes._Pointer, cctx: int, hctx: int, enc: int) -> int:
        try:
            now_epoch = self.epoch()
            if enc == 1:
                name, _, aes, params, _ = self._key(now_epoch)
                ctypes.memmove(key_name, name, 16)
                ctypes.memmove(iv, os.urandom(16), 16)
                if self.lib.EVP_EncryptInit_ex(cctx, self.cipher, None, aes, iv) != 1:
                    return -1
                if self.lib.EVP_MAC_CTX_set_params(hctx, params) != 1:
                    return -1
                self.issued += 1
                return 1
            wanted = ctypes.string_at(key_name, 16)
            for e in (now_epoch, now_epoch - 1, now_epoch - 2, now_epoch + 1):
                name, _, aes, params, _ = self._key(e)
                if name == wanted:
                    if self.lib.EVP_MAC_CTX_set_params(hctx, params) != 1:
                        return -1
                    if self.lib.EVP_DecryptInit_ex(cctx, self.cipher, None, aes, iv) != 1:
                        return -1
                    if e == now_epoch:
                        self.resumed += 1
                        return 1
                    self.renewed += 1
                    return 2  # good, but issue a fresh ticket under the current key
            self.unknown += 1
            return 0  # not ours (or too old): full handshake
        except BaseException as e:
            self.on_error(e)
            return -1 if enc == 1 else 0


def install_ticket_keys(ctx: ssl.SSLContext, derive: KeyFn, period: float, on_error: Callable[[BaseException], None]) -> TicketKeys:
    lib = libssl()
    ptr = ctx_pointer(ctx)
    tk = TicketKeys(derive, period, on_error)
    lib.SSL_CTX_set_tlsext_ticket_key_evp_cb.argtypes = [ctypes.c_void_p, TICKET_CB]
    lib.SSL_CTX_set_tlsext_ticket_key_evp_cb.restype = ctypes.c_int
    if lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(ptr, tk.cb) != 1:
        raise NativeUnavailable("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")
    ctx._ftpcluster_tickets = tk  # type: ignore[attr-defined]
    return tk
