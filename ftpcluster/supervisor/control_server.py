"""The supervisor side of the control socket, driven by the arbiter's selector.

Unix socket, mode 0600 in the state dir: only the owner (and root) may talk to
it. Requests and replies are single JSON lines. A handler may answer at once
(return a dict) or later (return None and keep the `Pending` to answer it,
as `stop` does once every node has ended).

A client gets REQUEST_TIMEOUT to send its request line, then it is dropped:
idle connections cannot pile up until the supervisor runs out of descriptors
(and when it does, accept_guard pauses the listener instead of failing)."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from .accept_guard import GuardedListener

log = structlog.get_logger("ftpcluster.supervisor")

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0


class Pending:
    """A client waiting for its reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.deadline = time.monotonic() + REQUEST_TIMEOUT

    def answer(self, reply: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.settimeout(2.0)
            self.sock.sendall(json.dumps(reply, default=str).encode() + b"\n")
        with contextlib.suppress(OSError):
            self.sock.close()


Handler = Callable[[dict[str, Any], Pending], "dict[str, Any] | None"]


class ControlServer:
    def __init__(self, path: Path, selector: selectors.BaseSelector, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.selector = selector
        self.handlers = handlers
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.listener = GuardedListener(self.sock, selector, self._on_accept, "control")
        self.reading: dict[Pending, None] = {}  # clients still sending their request, oldest first

    def _on_accept(self) -> None:
        for _ in range(16):
            client = self.listener.accept()
            if client is None:
                return
            client.setblocking(False)
            pending = Pending(client)
            self.reading[pending] = None
            self.selector.register(client, selectors.EVENT_READ, lambda p=pending: self._on_read(p))

    def expire(self, now: float) -> None:
        """Drop clients that never finished their request; bring a paused listener back."""
        for p in list(self.reading):
            if p.deadline > now:
                break
            self.reading.pop(p, None)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(p.sock)
            p.sock.close()
        self.listener.resume(now)

    def _on_read(self, p: Pending) -> None:
        try:
            chunk = p.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if chunk:
            p.buf += chunk
        if chunk and b"\n" not in p.buf and len(p.buf) <= MAX_REQUEST:
            return
        self.selector.unregister(p.sock)
        self.reading.pop(p, None)
        if not chunk and not p.buf:
            p.sock.close()
            return
        reply = self.dispatch(bytes(p.buf).split(b"\n", 1)[0], p)
        if reply is not None:
            p.answer(reply)

    def dispatch(self, line: bytes, p: Pending) -> dict[str, Any] | None:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": "request needs a 'cmd'"}
        handler = self.handlers.get(request["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['cmd']!r}"}
        try:
            return handler(request, p)
        except Exception as e:  # a bad request must not take the supervisor down
            log.exception("control command failed", cmd=request["cmd"])
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def close(self) -> None:
        for p in list(self.reading):
            with contextlib.suppress(Exception):
                self.selector.unregister(p.sock)
            p.sock.close()
        self.reading.clear()
        with contextlib.suppress(Exception):
            self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
