"""--daemon: fork once and detach; the waiting parent returns only when the detached
supervisor reports "ok" (every node accepts) or why it failed, through a pipe."""

from __future__ import annotations

import contextlib
import os
import selectors
import time


def wait_ready(fd: int, timeout: float) -> tuple[bool, str]:
    """--daemon parent: wait for the detached supervisor to say "ok" or why it failed."""
    deadline = time.monotonic() + timeout
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    while b"\n" not in buf and time.monotonic() < deadline:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    text = buf.decode(errors="replace").strip()
    if text == "ok":
        return True, ""
    if text.startswith("error: "):
        return False, text[7:]
    return False, text or "the supervisor exited before every node accepted"


def daemonize() -> tuple[int | None, int]:
    """Fork once, detach, redirect stdio. Returns (parent's read fd, -1) in the parent
    and (None, write fd) in the daemon."""
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        return r, -1
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return None, w



class ReadyReport:
    """The daemon's end of that pipe: one message, then closed (no-op without --daemon)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, message: str) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, message.encode()[:4000] + b"\n")
            os.close(self.fd)
        self.fd = None
