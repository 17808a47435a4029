"""accept() for the supervisor's listeners (control socket, metrics) that never
ends the supervisor.

Out of descriptors (EMFILE, ENFILE) or kernel memory (ENOBUFS, ENOMEM), the
pending connection stays in the backlog and the listener stays readable, so a
level-triggered selector would spin on it; an OSError escaping the loop used
to end the supervisor and with it every node. Instead the listener leaves the
selector for a short, growing pause (50 ms up to 1 s) and comes back on the
next tick; connections already accepted go on being served and closed, which
frees descriptors. A connection the client aborted (ECONNABORTED, EPROTO) is
just skipped."""

from __future__ import annotations

import errno
import selectors
import socket
import time
from typing import Any, Callable

import structlog

log = structlog.get_logger("ftpcluster.supervisor")

PAUSE_FIRST = 0.05
PAUSE_MAX = 1.0
SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}


class GuardedListener:
    """Owns a listening socket's place in the selector; `accept()` gives the next
    client or None (nothing pending, or paused)."""

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, on_ready: Callable[[], Any], name: str) -> None:
        self.sock = sock
        self.selector = selector
        self.on_ready = on_ready
        self.name = name
        self.paused_until = 0.0
        self.pause = 0.0
        self.failures = 0  # accept errors in the current episode (logged once per episode)
        selector.register(sock, selectors.EVENT_READ, on_ready)

    def accept(self) -> socket.socket | None:
        for _ in range(8):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                if e.errno in SKIP:
                    continue
                self._back_off(e)
                return None
            if self.failures:
                log.info("accepting again", listener=self.name, failed_accepts=self.failures)
                self.failures, self.pause = 0, 0.0
            return client
        return None

    def _back_off(self, e: OSError) -> None:
        self.failures += 1
        self.pause = min(PAUSE_MAX, self.pause * 2 or PAUSE_FIRST)
        self.paused_until = time.monotonic() + self.pause
        if self.failures == 1:
            log.warning("accept failed, pausing this listener", listener=self.name, error=e.strerror or str(e),
                        errno=errno.errorcode.get(e.errno or 0, e.errno), pause=self.pause)  # fmt: skip
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass

    def resume(self, now: float) -> None:
        """Back into the selector once the pause is over (called every tick)."""
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            try:
                self.selector.register(self.sock, selectors.EVENT_READ, self.on_ready)
            except (KeyError, ValueError, OSError):
                self.paused_until = now + self.pause  # epoll_ctl failed too (ENOMEM): later

    def wait_hint(self, now: float) -> float | None:
        """Seconds until the listener should be back, for the loop's select timeout."""
        return max(0.0, self.paused_until - now) if self.paused_until else None

    def close(self) -> None:
        if not self.paused_until:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()
