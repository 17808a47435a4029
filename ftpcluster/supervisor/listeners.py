"""Binding the listeners once, in the supervisor, before any fork."""

from __future__ import annotations

import socket

from ..config import LISTEN_BACKLOG, Config, format_hostport


class BindError(Exception):
    """A listener could not be bound; the message names the address and the reason."""


def bind_listener(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit these (Linux copies the listener's flags), which
        # saves two system calls per connection: ABOR's urgent byte stays inline,
        # replies are not held back by Nagle.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {format_hostport(host, port)}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def bind_all(cfg: Config) -> dict[str, socket.socket]:
    """{"control": sock, "implicit_tls": sock?}; closes what it bound if one fails."""
    out: dict[str, socket.socket] = {}
    try:
        out["control"] = bind_listener(*cfg.listen_address)
        implicit = cfg.implicit_tls_address
        if implicit is not None:
            out["implicit_tls"] = bind_listener(*implicit)
    except BindError:
        for s in out.values():
            s.close()
        raise
    return out
