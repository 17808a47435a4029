"""The supervisor's memcached thread: ban sync, TLS revocations, `bans` from the
cluster and this host's record (host_registry.py), off the arbiter's loop.

Why: the arbiter's tick reaps nodes, checks heartbeats and answers the control
socket; a memcached call there waits a round trip, and the whole timeout on a
hung server, so a SIGSTOPped memcached delayed reaping and stale-node checks.
Here one thread owns the Ring (with a HealthChecker, so status is true with or
without traffic) and a BanSync over its own mapping of the host's ban table
(BanTable serializes the two threads' writes). The loop only queues work:
operator bans and permits (`on_change`), revocations, `bans` requests, whose
reply the thread sends when the cluster's list is in (or its deadline passed).
The arbiter owns it (one per config generation), BanAdmin turns ban sync on.

Metrics counted on the thread are kept here and added on the loop
(`flush_counts`), so one thread writes the supervisor's metric cells."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any, Callable

import structlog

from ..cluster.ban_engine import BanEngine
from ..cluster.ban_layout import host_id, open_tables
from ..cluster.ban_sync import BanSync
from ..cluster.memcache_health import HealthChecker
from ..cluster.memcache_ring import Ring
from ..cluster.record_mac import load_record_mac
from ..cluster.session_seal import SealError
from ..config import Config

log = structlog.get_logger("ftpcluster.ban")
Job = Callable[[Ring, Any], Any]  # (ring, BanSync or None) -> result
MAX_JOBS = 10000


class ClusterSync:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.with_bans = False
        self.health = HealthChecker(cfg)
        self.ring = Ring(cfg, count=self.count, health=self.health)  # used on the thread only
        self.mac: Any = None  # RecordMac: what this host writes to memcached and believes back
        try:
            self.mac = load_record_mac(cfg, self.ring.prefix, count=self.count)
        except SealError as e:  # start and reload refuse this when bans use memcached (preflight)
            if cfg.ban.enabled and cfg.ban.cache == "memcache":
                log.error("no cluster key: bans are not shared through memcached", error=str(e))
        self.sync: Any = None  # BanSync, made on the thread
        self.periodic: list[Callable[[float], None]] = []  # run on the thread every round (host registry)
        self._jobs: collections.deque[tuple[Future[Any], Job, float | None]] = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        self._counts: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.rounds = 0  # sync rounds done (tests, status)
        self.last_round = 0.0

    # ------------------------------------------------------------ from the loop
    def start(self) -> "ClusterSync":
        self.health.start()
        self._thread = threading.Thread(target=self._run, name="cluster-sync", daemon=True)
        self._thread.start()
        return self

    def enable_bans(self) -> bool:
        """Sync bans through memcached (BanAdmin calls this once the host's tables exist)."""
        with self._wake:
            self.with_bans = self.mac is not None
            self._wake.notify()
        return self.with_bans

    def submit(self, fn: Job, deadline: float | None = None) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._wake:
            if len(self._jobs) >= MAX_JOBS:
                fut.set_exception(TimeoutError("cluster sync queue full"))
                return fut
            self._jobs.append((fut, fn, deadline))
            self._wake.notify()
        return fut

    def on_change(self, op: str, ban: Any) -> None:
        """A hook on the supervisor engine: operator bans and permits are published."""
        if self.with_bans:
            self.submit(lambda ring, sync: sync._on_change(op, ban) if sync is not None else None)

    def status(self) -> list[dict[str, Any]]:
        """Per server (read from the loop: plain attribute reads, no I/O)."""
        return self.ring.status()

    def publish_metrics(self, metrics: Any) -> None:
        """On the loop: what the thread counted, and whether each server is up."""
        if metrics is None:
            return
        for st in self.status():
            metrics.set("ftpcluster_memcache_up", int(st["up"]), (st["address"],))
        if not self._counts:
            return
        with self._count_lock:
            counts, self._counts = self._counts, Counter()
        for (name, labels), n in counts.items():
            metrics.inc(name, labels, n)

    def stop(self, wait: float = 0.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self.health.stop()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)

    # ------------------------------------------------------------ the thread
    def count(self, name: str, labels: tuple[str, ...]) -> None:
        """Thread-safe: kept until publish_metrics."""
        with self._count_lock:
            self._counts[(name, labels)] += 1

    def _make_sync(self) -> Any:
        table, _ = open_tables(self.cfg)
        engine = BanEngine(self.cfg, table, None, origin_host=host_id(self.cfg))
        return BanSync(engine, self.ring, host_id(self.cfg), self.mac, count=self.count)

    def _run(self) -> None:
        interval = max(0.02, self.cfg.memcache.sync_interval)
        next_round = 0.0
        while True:
            with self._wake:
                wait = next_round - time.monotonic()
                if not self._jobs and not self._stop and wait > 0:
                    self._wake.wait(wait)
                if self._stop:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            if self.with_bans and self.sync is None:
                with contextlib.suppress(Exception):  # tables missing: tried again next time
                    self.sync = self._make_sync()
                    next_round = 0.0  # the first full load comes before any job (e.g. `bans`)
            if time.monotonic() >= next_round:
                next_round = time.monotonic() + interval
                self._round()
            for fut, fn, deadline in jobs:
                self._run_job(fut, fn, deadline)
        if self.sync is not None:
            self.sync.engine.table.close()
        self.ring.close()

    def _round(self) -> None:
        """Ban sync and the periodic tasks; an error is logged, the next round comes."""
        try:
            self.ring.probe()
            if self.sync is not None:
                self.sync.publish_local()
                self.sync.sync()
        except Exception:  # the cluster side must never end the thread
            log.exception("cluster sync failed")
        for task in list(self.periodic):
            try:
                task(time.monotonic())
            except Exception:
                log.exception("cluster task failed")
        self.rounds += 1
        self.last_round = time.time()

    def _run_job(self, fut: Future[Any], fn: Job, deadline: float | None) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        if deadline is not None and time.monotonic() > deadline:
            fut.set_exception(TimeoutError("deadline passed in the queue"))
            return
        try:
            fut.set_result(fn(self.ring, self.sync))
        except BaseException as e:
            fut.set_exception(e)


_held: list[Any] = []


def _take_write_locks() -> None:
    """Before fork(): no other thread may be inside a log write (the child would
    inherit the lock taken by a thread it does not have, and hang on its first line)."""
    import structlog._output as out

    for lock in list(out.WRITE_LOCKS.values()):
        lock.acquire()
        _held.append(lock)


def _release_write_locks() -> None:
    while _held:
        _held.pop().release()


os.register_at_fork(before=_take_write_locks, after_in_parent=_release_write_locks, after_in_child=_release_write_locks)
