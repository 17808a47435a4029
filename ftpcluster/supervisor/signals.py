"""The supervisor's signal queue, after gunicorn's arbiter: a handler only notes the
signal and wakes the loop through a pipe; the loop runs the work.

The queue is bounded (gunicorn keeps at most 5): a burst of signals faster than
the loop runs cannot grow memory, and repeating a signal the loop has not yet seen
adds nothing. SIGCHLD is never queued, it only wakes the loop (every tick reaps),
so a storm of dying children cannot push a SIGTERM out of the queue."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
from typing import Any

QUEUED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)
MAX_QUEUED = 5


class SignalQueue:
    """Signals for the loop: `fileno()` becomes readable when one arrived."""

    def __init__(self, limit: int = MAX_QUEUED) -> None:
        self.limit = limit
        self.pending: collections.deque[int] = collections.deque()
        self.dropped = 0  # signals that found the queue full
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self.wake_r

    def install(self) -> None:
        for sig in QUEUED:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, self._on_child)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if len(self.pending) < self.limit:
            self.pending.append(signum)
        else:
            self.dropped += 1
        self.wake()

    def _on_child(self, signum: int, frame: Any) -> None:
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b".")

    def drain_wake(self) -> None:
        """Empty the wake pipe (the selector calls this when it is readable)."""
        with contextlib.suppress(OSError):
            while os.read(self.wake_r, 4096):
                pass

    def pop(self) -> int | None:
        """The oldest queued signal, or None."""
        return self.pending.popleft() if self.pending else None

    def __bool__(self) -> bool:
        return bool(self.pending)

    def fds(self) -> list[int]:
        """Descriptors a forked node must close."""
        return [self.wake_r, self.wake_w]
