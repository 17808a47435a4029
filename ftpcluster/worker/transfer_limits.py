"""Node service: rates, quotas and the maximum upload size of `[limits]`.

Checked synchronously when a transfer starts (`check`, called by the session
core): 552 before any byte when the size is known (ALLO, REST, APPE) and
would pass `max_upload_size` or the quota, or when the quota is already used
up. A transfer with limits gets `Transfer.wrap`, which puts the buckets and the
upload guard around its data stream (worker/throttle.py); a transfer without
any keeps the plain stream and its zero-copy paths.

memcached calls run on the node's memcached thread (cluster/memcache_thread.py:
one Ring, the node's health checker, a deadline per job), home scans on a
thread of their own; the event loop only awaits them, never longer than
`mc_wait`, then falls back as when memcached is down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import structlog

from ..cluster.host_lease import HostLeases
from ..cluster.memcache_ring import Ring
from ..cluster.memcache_thread import DeadlinePassed
from ..cluster.metrics_store import SlotWriter
from ..cluster.quota_store import LocalUsage, MemcacheUsage, Reserved, scan_home
from ..cluster.rate_lease import RateLeaser
from ..cluster.record_mac import load_record_mac
from ..cluster.session_seal import SealError
from ..limits import NONE, UserLimits, host_rates, limits_for
from ..sizes import format_size
from .datachannel import DataRefused
from .node_api import NodeCore
from .protocol import Event, EventName, SessionInfo, Transfer
from .session import Session
from .throttle import Bucket, ClusterBucket, Limiter, LocalBucket, wrap_stream

log = structlog.get_logger("ftpcluster.limits")
SNAPSHOT_AGE = 1.0  # a usage snapshot older than this is refreshed in the background
LOOP_EVERY = 1.0


class QuotaGuard:
    """One upload's accounts: refuses (552) the piece that would pass the quota or
    the maximum size, before it is written; reserves received bytes in the shared
    counters as it goes (so other hosts see them); settles from the disk at the end.

    A scan stored meanwhile (a new generation of the usage) skipped our temporary
    file, so an atomic upload's moves add its reservations again until it is named.
    What a scan saw of a file written in place, or of one being renamed, nobody
    can tell: the user is then rescanned once the upload is over."""

    def __init__(self, svc: NodeTransferLimits, user: str, home: str, lim: UserLimits, t: Transfer,
                 existing: int | None, used: int | None) -> None:  # fmt: skip
        self.svc, self.user, self.home, self.lim, self.t = svc, user, home, lim, t
        self.existing = existing
        self.base = (existing or 0) if t.append else t.offset  # file size before the first new byte
        self.known = used  # total usage as last heard, our reservations included
        self.got = self.pending = self.reserved = self.reserved_files = 0
        self.step = max(64 << 10, min(1 << 20, lim.quota_bytes // 20))
        self.gen: int | None = None  # generation of the usage our reservations went into
        self.named = False  # eof: the file may have its final name
        self.unsure = False  # a scan came where only a rescan can tell what it saw

    def _reserved(self) -> Reserved | None:
        """What a move must add again if a scan replaced the usage (atomic uploads
        until named: the scan skipped the temporary file)."""
        if self.gen is None or not self.t.temp_path:
            return None
        return self.gen, self.reserved, self.reserved_files

    async def _reserve(self, d_bytes: int, d_files: int) -> int:
        """Reserve more; the usage now (bytes)."""
        got = await self.svc.quota_add(self.user, self.home, d_bytes, d_files, on_disk=False, rebase=self._reserved())
        self.reserved += d_bytes
        self.reserved_files += d_files
        self._seen(got[2])
        return got[0]

    def _seen(self, gen: int) -> None:
        if self.gen is not None and gen != self.gen and (self.named or not self.t.temp_path):
            self.unsure = True
        self.gen = gen

    async def eof(self) -> None:
        """The upload is complete and about to get its name: reserve the rest, and
        the new file, before a rescan could see it (settling afterwards could
        count it twice)."""
        if not self.lim.has_quota:
            return
        d, self.pending = self.pending, 0
        files = int(self.existing is None)
        if d or files or self.gen is not None:  # with nothing to add: a scan since, still before the name
            await self._reserve(d, files)
        self.named = True

    async def received(self, n: int) -> None:
        self.got += n
        lim = self.lim
        if lim.max_upload_size and self.base + self.got > lim.max_upload_size:
            self._refuse("max_upload_size", f"File size limit exceeded ({format_size(lim.max_upload_size)} per file)")
        if not lim.quota_bytes:
            return
        self.pending += n
        if self.known is not None and self.known + self.pending > lim.quota_bytes:
            self._refuse("bytes", "Exceeded storage allocation (quota)")
        if self.known is None or self.pending >= self.step:
            d, self.pending = self.pending, 0
            self.known = await self._reserve(d, 0)
            if self.known > lim.quota_bytes:
                self._refuse("bytes", "Exceeded storage allocation (quota)")

    def _refuse(self, limit: str, text: str) -> None:
        """Leave nothing partial under the final name, then 552."""
        t = self.t
        if not t.temp_path:
            with contextlib.suppress(OSError):
                if (t.append or t.offset) and self.existing is not None:
                    os.truncate(t.path, self.existing)  # APPE, REST n STOR: the size it had
                else:
                    os.unlink(t.path)
        self.svc.count("ftpcluster_quota_refusals_total", (limit, "during"))
        log.info("upload cut", user=self.user, limit=limit, path=t.virtual, received=self.got)
        raise DataRefused(552, text)

    def finished(self, moved: int) -> None:
        if not self.lim.has_quota:
            return  # only max_upload_size: no usage to keep
        after = _size(self.t.path)
        d_bytes = (after or 0) - (self.existing or 0) - self.reserved
        d_files = int(after is not None) - int(self.existing is not None) - self.reserved_files
        rebase = self._reserved()
        self.reserved = self.reserved_files = 0
        if d_bytes or d_files or self.gen is not None:  # also to see whether a scan came since
            self.svc.quota_add_soon(self.user, self.home, d_bytes, d_files, rebase, self)


def _size(path: str) -> int | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class NodeTransferLimits:
    events = frozenset({EventName.LOGIN, EventName.DELETE, EventName.RENAME})  # protocol.hears

    def __init__(self, server: NodeCore, metrics: SlotWriter | None = None) -> None:
        self.server = server
        self.metrics = metrics
        cfg = self.cfg = server.cfg
        self.slot = cfg.limits.rate_slot
        self.nodes = max(1, cfg.server.nodes)
        self.mc = cfg.memcache.enabled  # leases and usage records go through the node's memcached thread
        # A memcached job not started within this is dropped, and not waited on longer:
        # the caller falls back (host share of a rate, local usage) as when memcached is down.
        self.mc_wait = max(0.5, 2 * cfg.memcache.timeout)
        self.fs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quota-scan")
        self._ring: Any = None
        self._leaser: Any = None
        self._mcu: MemcacheUsage | None = None
        self.local = LocalUsage(cfg.state_dir)
        self.local_fresh: set[str] = set()  # users whose local file this node has scanned in
        self.stale: set[str] = set()  # usage moved while memcached did not answer
        self.usage: dict[str, tuple[int, int, float]] = {}  # user -> (bytes, files, when)
        self.refreshing: set[str] = set()
        self.quota_users: dict[str, str] = {}  # user -> home, for background rescans
        self.buckets: dict[tuple[str, str], ClusterBucket] = {}
        self.host_leases: Any = None
        try:
            self.host_leases = HostLeases(cfg.state_dir / "rates.shm")
        except (OSError, ValueError) as e:
            log.error("rate table unavailable: each node takes its own share of host limits", error=str(e))
        down, up = host_rates(cfg)
        self.host: dict[str, ClusterBucket] = {}
        for direction, rate in (("out", down), ("in", up)):
            if rate:
                self.host[direction] = ClusterBucket(f"host:{direction}", rate, self.slot, self.host_lease)
        self.fallback: dict[tuple[str, int], int] = {}
        self._limits_cache: dict[Any, UserLimits] = {}
        self.last_rescan = time.monotonic()
        self.last_lease = 0.0

    # ------------------------------------------------------------ who gets what
    def limits_of(self, s: Session) -> tuple[UserLimits, str]:
        user = s.user
        if user is None:
            return NONE, ""
        return self.user_limits(user.name, user.anonymous), user.name

    def user_limits(self, name: str, anonymous: bool) -> UserLimits:
        rec = None if anonymous else self.server.auth.users.get(name)
        lim = self._limits_cache.get(rec)
        if lim is None:
            if len(self._limits_cache) > 10000:
                self._limits_cache.clear()
            try:
                lim = limits_for(self.cfg, rec)
            except ValueError as e:  # a bad value in the users file: no limits rather than no service
                log.error("bad limits for user", user=name, error=str(e))
                lim = limits_for(self.cfg, None)
            self._limits_cache[rec] = lim
        return lim

    def check(self, s: Session, t: Transfer) -> tuple[int, str] | None:
        """Before 150: a refusal (code, text), or None; sets `t.wrap` when limits apply."""
        allo, s.allo = s.allo, 0
        if t.kind == "send_lines" or s.user is None:
            return None
        lim, name = self.limits_of(s)
        direction = "in" if t.kind == "receive_file" else "out"
        user_rate, session_rate = lim.rates(direction)
        host = self.host.get(direction)
        guard = None
        if direction == "in" and (lim.max_upload_size or lim.has_quota):
            home = s.home.root if s.home is not None else ""
            existing = _size(t.path)
            base = (existing or 0) if t.append else t.offset
            final = base + allo
            if lim.max_upload_size and final > lim.max_upload_size:
                self.count("ftpcluster_quota_refusals_total", ("max_upload_size", "before"))
                return 552, f"File size limit exceeded ({format_size(lim.max_upload_size)} per file)"
            used = None
            if lim.has_quota:
                self.quota_users[name] = home
                snap = self.snapshot(name, home)
                if snap is not None:
                    used_b, used_f = snap
                    used = used_b
                    if lim.quota_files and existing is None and used_f + 1 > lim.quota_files:
                        self.count("ftpcluster_quota_refusals_total", ("files", "before"))
                        return 552, f"Exceeded storage allocation (quota: {lim.quota_files} files)"
                    grow = final - (existing or 0) if (t.append or t.offset) else final
                    if lim.quota_bytes and (used_b >= lim.quota_bytes or used_b + max(0, grow) > lim.quota_bytes):
                        self.count("ftpcluster_quota_refusals_total", ("bytes", "before"))
                        return 552, f"Exceeded storage allocation (quota: {format_size(lim.quota_bytes)})"
            guard = QuotaGuard(self, name, home, lim, t, existing, used)
        if not (user_rate or session_rate or host is not None or guard is not None):
            return None
        t.wrap = lambda stream: self._wrap(stream, name, direction, user_rate, session_rate, host, guard)
        return None

    def _wrap(self, stream: Any, user: str, direction: str, user_rate: int, session_rate: int,
              host: ClusterBucket | None, guard: QuotaGuard | None) -> Any:  # fmt: skip
        buckets: list[Bucket] = []
        if session_rate:
            buckets.append(LocalBucket(session_rate, self.slot))
        cluster = None
        if user_rate:
            key = (user, direction)
            cluster = self.buckets.get(key)
            if cluster is None or cluster.rate != user_rate:
                cluster = ClusterBucket(f"{direction}:{user}", user_rate, self.slot, self.lease)
                self.buckets[key] = cluster
            cluster.users += 1
            buckets.append(cluster)
        if host is not None:
            buckets.append(host)
        throttled = bool(buckets)

        def closed(moved: int, waits: int) -> None:
            if cluster is not None:
                cluster.users -= 1
                if cluster.users <= 0 and self.buckets.get((user, direction)) is cluster:
                    del self.buckets[(user, direction)]
            if throttled:
                self.count("ftpcluster_throttled_bytes_total", (direction,), moved)
                if waits:
                    self.count("ftpcluster_throttle_waits_total", (direction,), waits)

        return wrap_stream(stream, Limiter(buckets, guard, closed))

    # ------------------------------------------------------------ rates
    async def lease(self, name: str, slot: int, budget: int, want: int) -> int:
        """A user's rate: from the cluster budget in memcached, else this host's share of it."""
        if self.mc:
            got = await self._mc(self._lease_blocking, name, slot, budget, want)
            if got is not None:
                return int(got)
        hosts = self.cfg.limits.fallback_hosts or (self._leaser.hosts if self._leaser is not None else 1)
        return await self.host_lease(name, slot, max(1, budget // max(1, hosts)), want)

    async def host_lease(self, name: str, slot: int, budget: int, want: int) -> int:
        """Out of a budget for this whole host, shared by its nodes (shared memory);
        without the table, this node's 1/nodes of it."""
        if self.host_leases is not None:
            got = self.host_leases.take(name, slot, budget, want)
            if got is not None:
                return got
        share = max(1, budget // self.nodes)
        key = (name, slot)
        taken = self.fallback.get(key, 0)
        self.fallback[key] = taken + want
        if len(self.fallback) > 4096:
            self.fallback = {k: v for k, v in self.fallback.items() if k[1] >= slot - 2}
        return max(0, min(want, share - taken))

    async def _mc(self, fn: Callable[..., Any], *args: Any, failed: Any = None) -> Any:
        """fn(*args) on the node's memcached thread (its Ring; the leaser and usage store
        are bound to it there), or `failed` when it was not done within mc_wait."""

        def job(ring: Ring) -> Any:
            self._bind(ring)
            return fn(*args)

        fut = self.server.memcache().submit(job, deadline=time.monotonic() + self.mc_wait)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.mc_wait)
        except (asyncio.TimeoutError, DeadlinePassed):
            return failed

    def _bind(self, ring: Ring) -> None:
        """On the memcached thread: the rate leaser and usage store over its Ring."""
        if self._ring is ring:
            return
        loop = self.server.loop
        count = lambda n, l: loop.call_soon_threadsafe(self.count, n, l)  # noqa: E731
        try:
            mac = load_record_mac(self.cfg, ring.prefix, count=count)
        except SealError as e:
            log.error("no cluster key: usage stays on this host, rate counters have plain names", error=str(e))
            mac = None
        self._leaser = RateLeaser(ring, mac)
        self._mcu = MemcacheUsage(ring, mac, self.cfg.limits.quota_rescan_interval) if mac else None
        self._ring = ring

    def _lease_blocking(self, name: str, slot: int, budget: int, want: int) -> int | None:
        self.last_lease = time.monotonic()
        return self._leaser.lease(name, slot, budget, want)

    # ------------------------------------------------------------ usage
    def snapshot(self, user: str, home: str) -> tuple[int, int] | None:
        """The usage as last heard (refreshed in the background when old)."""
        got = self.usage.get(user)
        if got is None or time.monotonic() - got[2] > SNAPSHOT_AGE:
            self.refresh(user, home)
        return (got[0], got[1]) if got is not None else None

    def refresh(self, user: str, home: str) -> None:
        if user in self.refreshing:
            return
        self.refreshing.add(user)
        task = self.server.loop.create_task(self.quota_add(user, home, 0, 0, on_disk=True))
        task.add_done_callback(lambda _t: self.refreshing.discard(user))
        self.server.track(task)

    def quota_add_soon(self, user: str, home: str, d_bytes: int, d_files: int, rebase: Reserved | None = None,
                       guard: QuotaGuard | None = None) -> None:  # fmt: skip
        """A change on the disk; an upload's last move (`guard`) also checks whether a
        scan came that it cannot account for, and has the user rescanned then."""
        got = self.usage.get(user)
        if got is not None:  # at once for this node's next check; the shared counters follow
            self.usage[user] = (max(0, got[0] + d_bytes), max(0, got[1] + d_files), got[2])

        async def move() -> None:
            gen = (await self.quota_add(user, home, d_bytes, d_files, on_disk=True, rebase=rebase))[2]
            if guard is not None:
                guard._seen(gen)
                if guard.unsure:
                    self.stale.add(user)  # the background loop rescans within a second

        self.server.track(self.server.loop.create_task(move()))

    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.server.loop.run_in_executor(pool, fn, *args)

    def _mc_add(self, user: str, d_bytes: int, d_files: int, rebase: Reserved | None) -> tuple[int, int, int] | None:
        return self._mcu.add(user, d_bytes, d_files, rebase) if self._mcu is not None else None

    def _mc_token(self, user: str) -> tuple[bool, Any]:
        return self._mcu.token(user) if self._mcu is not None else (False, None)

    def _mc_store_scan(self, user: str, b: int, f: int, token: Any) -> int | None:
        return self._mcu.store_scan(user, b, f, token) if self._mcu is not None else None

    async def quota_add(self, user: str, home: str, d_bytes: int, d_files: int, on_disk: bool,
                        rebase: Reserved | None = None) -> tuple[int, int, int]:  # fmt: skip
        """Move a user's usage; the new (bytes, files, generation). `on_disk`: the
        change is already on the disk (a rescan would see it), else it is a
        reservation. `rebase`: an upload's reservations so far, added again if a
        scan replaced them (quota_store.Reserved)."""
        if self.mc:
            got = await self._mc(self._mc_add, user, d_bytes, d_files, rebase)
            if got is not None:
                return self._remember(user, got)
            scanned = await self._scan_into_memcache(user, home)  # no record (or not ours), or memcached down
            if scanned is not None:
                if on_disk:  # the scan saw the change
                    return scanned
                got = await self._mc(self._mc_add, user, d_bytes, d_files, rebase)
                if got is not None:
                    return self._remember(user, got)
            self.stale.add(user)  # rescanned into memcached once it answers again
            self.count("ftpcluster_quota_fallbacks_total")
        if user in self.local_fresh:
            got = await self._on(self.fs, self.local.add, user, d_bytes, d_files, rebase)
            if got is not None:
                return self._remember(user, got)
        scanned = await self._scan_into_local(user, home)
        if on_disk:
            return scanned
        got = await self._on(self.fs, self.local.add, user, d_bytes, d_files, rebase)
        return self._remember(user, got) if got is not None else scanned

    def _remember(self, user: str, got: tuple[int, int, int]) -> tuple[int, int, int]:
        self.usage[user] = (got[0], got[1], time.monotonic())
        return got

    async def _scan_into_local(self, user: str, home: str, tries: int = 3) -> tuple[int, int, int]:
        """Scan the home into this host's file, unless another node moved the usage
        during the scan (then again; at last unconditionally)."""
        for i in range(tries):
            token = await self._on(self.fs, self.local.token, user)
            b, f = await self._on(self.fs, scan_home, home)
            gen = None
            if token is not None and i < tries - 1:
                gen = await self._on(self.fs, self.local.store_scan, user, b, f, token)
            elif i == tries - 1:
                gen = await self._on(self.fs, self.local.put, user, b, f)
            if gen is not None:
                break
        self.local_fresh.add(user)
        return self._remember(user, (b, f, gen or 0))

    async def _scan_into_memcache(self, user: str, home: str, tries: int = 3) -> tuple[int, int, int] | None:
        """Scan the home and store the result, unless the usage moved during the scan
        (then again, a few times): a rescan never overwrites a concurrent change."""
        for _ in range(tries):
            answered, token = await self._mc(self._mc_token, user, failed=(False, None))
            if not answered:
                return None
            b, f = await self._on(self.fs, scan_home, home)
            gen = await self._mc(self._mc_store_scan, user, b, f, token)
            if gen:
                self.stale.discard(user)
                self.local_fresh.discard(user)  # a later outage starts from a fresh scan
                return self._remember(user, (b, f, gen))
        return None

    async def rescan(self, user: str, home: str) -> None:
        if self.mc and await self._scan_into_memcache(user, home) is not None:
            return
        await self._scan_into_local(user, home)
        if not self.mc:
            self.stale.discard(user)

    # ------------------------------------------------------------ events and background work
    def __call__(self, event: Event, info: SessionInfo | None) -> None:
        if info is None or info.user is None:
            return
        name = event.name
        if name not in (EventName.LOGIN, EventName.DELETE, EventName.RENAME):
            return
        user = info.user
        lim = self.user_limits(user, info.anonymous)
        if not lim.has_quota or not info.home:
            return
        home = info.home
        self.quota_users[user] = home
        if name == EventName.LOGIN:
            self.refresh(user, home)
            return
        size = event.fields.get("size" if name == EventName.DELETE else "replaced_size")
        if isinstance(size, int) and size >= 0:
            self.quota_add_soon(user, home, -size, -1)

    async def background(self) -> None:
        """Rescan users memcached missed changes of, every user with a quota once per
        `quota_rescan_interval` (one host per user, elected in memcached), and keep
        the host count for the fallback share."""
        interval = self.cfg.limits.quota_rescan_interval
        while not self.server.stopped.is_set():
            await asyncio.sleep(LOOP_EVERY)
            with contextlib.suppress(Exception):
                up = self.mc and await self._mc(self._refresh_hosts, failed=False)
                for user in list(self.stale) if up or not self.mc else []:  # no scan a second while memcached is away
                    home = self.quota_users.get(user)
                    if home is not None:
                        await self.rescan(user, home)
                if interval and time.monotonic() - self.last_rescan >= interval:
                    self.last_rescan = time.monotonic()
                    for user, home in list(self.quota_users.items()):
                        if not self.mc or await self._mc(self._claim, user, interval, failed=False):
                            await self.rescan(user, home)

    def _refresh_hosts(self) -> bool:
        """Re-read the host count; whether any server is up (the thread probes ejected
        servers itself on every wake-up)."""
        busy = time.monotonic() - self.last_lease < 30.0 or self._leaser.hosts <= 1
        self._leaser.refresh_hosts(every=2.0 if busy else 10.0)  # cheap when no rate is in use
        return bool(self._ring.any_up())

    def _claim(self, user: str, interval: float) -> bool:
        return self._mcu.claim_rescan(user, interval) if self._mcu is not None else True

    # ------------------------------------------------------------ SITE QUOTA
    def site_quota(self, s: Session) -> list[str]:
        lim, user = self.limits_of(s)
        home = s.home.root if s.home is not None else ""
        snap = self.snapshot(user, home) if lim.has_quota else None
        lines = [f"Quota for {user}:"]
        if not lim.has_quota:
            lines.append(" No quota.")
        elif snap is None:
            lines.append(" Usage not known yet; try again in a moment.")
        else:
            cap_b = f"{lim.quota_bytes} ({format_size(lim.quota_bytes)})" if lim.quota_bytes else "unlimited"
            lines.append(f" Used bytes: {snap[0]} of {cap_b}")
            lines.append(f" Used files: {snap[1]} of {lim.quota_files or 'unlimited'}")
        lines.append(f" Max upload size: {format_size(lim.max_upload_size) if lim.max_upload_size else 'unlimited'}")
        lines.append(f" Download rate: {format_size(lim.download_rate) + '/s' if lim.download_rate else 'unlimited'}")
        lines.append(f" Upload rate: {format_size(lim.upload_rate) + '/s' if lim.upload_rate else 'unlimited'}")
        lines.append("End")
        return lines

    def count(self, name: str, labels: tuple[str, ...] = (), n: int = 1) -> None:
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.inc(name, labels, n)

