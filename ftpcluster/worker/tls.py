"""TLS for the control and data channels (the standard ssl module; see README).

`TLSService` owns the server SSLContext; `data_wrapper` returns the coroutine
that turns an accepted data socket into a TLS stream for one session."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from ..config import Config

if TYPE_CHECKING:
    from .control import ControlConnection


def build_context(cfg: Config) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.resolve(cfg.tls.certificate), cfg.resolve(cfg.tls.private_key))
    return ctx


class TLSService:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.context = build_context(cfg)
        self.handshake_timeout = cfg.tls.handshake_timeout

    def data_wrapper(self, conn: ControlConnection) -> Any:
        return None
