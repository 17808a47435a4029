"""The supervisor side of the control socket, driven by the arbiter's selector.

Unix socket, mode 0600 in the state dir: only the owner (and root) may talk to
it. Requests and replies are single JSON lines. A handler may answer at once
(return a dict) or later (return None and keep the `Pending` to answer it,
as `stop` does once every node has ended)."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
from pathlib import Path
from typing import Any, Callable

MAX_REQUEST = 64 * 1024


class Pending:
    """A client waiting for its reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

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
        selector.register(self.sock, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self) -> None:
        for _ in range(16):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            client.setblocking(False)
            pending = Pending(client)
            self.selector.register(client, selectors.EVENT_READ, lambda p=pending: self._on_read(p))

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
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.selector.unregister(self.sock)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
