"""The supervisor's signal queue (supervisor/signals.py), in-process: bounded like
gunicorn's, and SIGCHLD only wakes the loop so dying children cannot crowd out a
SIGTERM."""

from __future__ import annotations

import os
import select
import signal

from ftpcluster.supervisor.arbiter import SIGNAL_HANDLERS, Arbiter
from ftpcluster.supervisor.signals import MAX_QUEUED, QUEUED, SignalQueue


def _woken(q: SignalQueue) -> bool:
    return bool(select.select([q.fileno()], [], [], 0)[0])


def test_queue_is_bounded_and_keeps_the_oldest() -> None:
    q = SignalQueue()
    try:
        for sig in (signal.SIGTERM, *[signal.SIGTTIN] * (MAX_QUEUED + 2)):
            q._on_signal(sig, None)
        assert _woken(q)
        got = [s for s in iter(q.pop, None)]
        assert got == [signal.SIGTERM] + [signal.SIGTTIN] * (MAX_QUEUED - 1) and q.dropped == 3
        q.drain_wake()
        assert not _woken(q) and q.pop() is None and not q
    finally:
        for fd in q.fds():
            os.close(fd)


def test_sigchld_wakes_without_queueing() -> None:
    q = SignalQueue()
    try:
        for _ in range(50):
            q._on_child(signal.SIGCHLD, None)
        assert _woken(q) and not q and q.dropped == 0
        q._on_signal(signal.SIGTERM, None)
        assert q.pop() == signal.SIGTERM
    finally:
        for fd in q.fds():
            os.close(fd)


def test_every_queued_signal_has_a_handler() -> None:
    assert set(QUEUED) == set(SIGNAL_HANDLERS)
    for name in SIGNAL_HANDLERS.values():
        assert callable(getattr(Arbiter, name))
