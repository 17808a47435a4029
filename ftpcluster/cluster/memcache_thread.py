"""A node's memcached thread: every memcached call of the process runs here.

Why: a memcached call on an event loop stalls every session of the node for a
round trip, and for the whole timeout when a server hangs (SIGSTOP, a
blackholed route). The loop submits a job (a function of the thread's Ring)
and awaits its future with a deadline of its own; a job still queued when its
deadline passed is dropped unrun, so a hung server cannot build a backlog that
outlives it. The thread owns the Ring (a Ring belongs to one thread) and a
HealthChecker: down servers are skipped, ejected ones taken back when they
answer again, with or without traffic (`Ring.probe` on every wake-up)."""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

from ..config import Config
from .memcache_health import HealthChecker
from .memcache_ring import Count, Ring

T = TypeVar("T")
MAX_QUEUE = 5000


class DeadlinePassed(Exception):
    """The job waited in the queue past its deadline and was not run."""


class MemcacheThread:
    def __init__(self, cfg: Config, count: Count | None = None, name: str = "memcache") -> None:
        self.cfg = cfg
        self.count = count
        self.health = HealthChecker(cfg)
        self.ring: Ring | None = None  # made on the thread
        self._jobs: collections.deque[tuple[Future[Any], Callable[[Ring], Any], float | None]] = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        self._name = name
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def start(self) -> "MemcacheThread":
        if self._thread is None:
            self.health.start()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        return self

    def submit(self, fn: Callable[[Ring], T], deadline: float | None = None) -> Future[T]:
        """Run fn(ring) on the thread. `deadline` (monotonic): not started after it."""
        fut: Future[T] = Future()
        with self._wake:
            if len(self._jobs) >= MAX_QUEUE:
                self.dropped += 1
                fut.set_exception(DeadlinePassed("memcached queue full"))
                return fut
            self._jobs.append((fut, fn, deadline))
            self._wake.notify()
        if self._thread is None:
            self.start()
        return fut

    def queued(self) -> int:
        return len(self._jobs)

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self.health.stop()

    def _run(self) -> None:
        ring = self.ring = Ring(self.cfg, count=self.count, health=self.health)
        tick = max(0.05, min(self.cfg.memcache.probe_interval, 1.0))
        while True:
            with self._wake:
                if not self._jobs and not self._stop:
                    self._wake.wait(tick)
                if self._stop:
                    break
                job = self._jobs.popleft() if self._jobs else None
            ring.probe()
            if job is None:
                continue
            fut, fn, deadline = job
            if not fut.set_running_or_notify_cancel():
                continue
            if deadline is not None and time.monotonic() > deadline:
                self.dropped += 1
                fut.set_exception(DeadlinePassed("deadline passed in the queue"))
                continue
            try:
                fut.set_result(fn(ring))
            except BaseException as e:
                fut.set_exception(e)
        ring.close()
