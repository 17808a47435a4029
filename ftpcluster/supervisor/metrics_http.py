"""Prometheus scrape endpoint served by the supervisor's own selector loop: no thread,
no framework. Each scrape sums the nodes' shared-memory rows at that moment.

Requests are tiny and bounded (8 KB, 5 s); anything but GET /metrics is a 404."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from typing import Callable

from ..config import parse_hostport
from .accept_guard import GuardedListener

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsHTTP:
    def __init__(self, listen: str, selector: selectors.BaseSelector, render: Callable[[], str]) -> None:
        host, port = parse_hostport(listen, "metrics.listen")
        self.selector = selector
        self.render = render
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.clients: dict[socket.socket, tuple[bytearray, float]] = {}
        self.listener = GuardedListener(self.sock, selector, self._on_accept, "metrics")

    def _on_accept(self) -> None:
        for _ in range(16):
            c = self.listener.accept()
            if c is None:
                return
            c.setblocking(False)
            self.clients[c] = (bytearray(), time.monotonic() + REQUEST_TIMEOUT)
            self.selector.register(c, selectors.EVENT_READ, lambda c=c: self._on_read(c))

    def _on_read(self, c: socket.socket) -> None:
        buf, _ = self.clients[c]
        try:
            chunk = c.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        buf += chunk
        if chunk and b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < MAX_REQUEST:
            return
        self._finish(c, buf if chunk or buf else None)

    def _finish(self, c: socket.socket, request: bytes | None) -> None:
        self.selector.unregister(c)
        self.clients.pop(c, None)
        if request:
            parts = bytes(request).split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and parts[1].split(b"?")[0] in (b"/metrics", b"/"):
                body = self.render().encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                payload = head.encode() + (body if parts[0] == b"GET" else b"")
            else:
                payload = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n"
            with contextlib.suppress(OSError):
                c.setblocking(True)
                c.settimeout(2.0)
                c.sendall(payload)
        with contextlib.suppress(OSError):
            c.close()

    def expire(self, now: float) -> None:
        """Drop clients that never finished their request; bring a paused listener
        back (called every tick)."""
        for c, (_, deadline) in list(self.clients.items()):
            if now > deadline:
                self._finish(c, None)
        self.listener.resume(now)

    def close(self) -> None:
        for c in list(self.clients):
            self._finish(c, None)
        with contextlib.suppress(Exception):
            self.listener.close()
