"""The two-level TLS session store behind the native session-cache hooks.

L1 is the host's shared memory (every node of a host, microseconds). L2 is
memcached through the ring (every host). New sessions go to L1 at once and to
L2 from a background thread, so a handshake never waits on a write. A lookup
that misses L1 asks L2 with the ring's short timeout (the only wait a handshake
can see, bounded by `[memcache] timeout`, and gone once a dead server is
ejected), and copies a hit into L1.

Entries in memcached hold the master secret, so they are sealed (AES-GCM under
the cluster key, the session id as associated data): whoever reads memcached
reads nothing, and an entry moved to another id does not open. A value that
fails to open is a miss (counted as rejected, kind "tls"). Entries are bounded
(`MAX_ENTRY`)."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..config import Config
from .memcache_ring import Ring
from .record_mac import RecordMac, server_of
from .session_seal import Sealer

MAX_ENTRY = 10 * 1024
MAX_PENDING = 2000
MetricCount = Callable[[str, tuple[str, ...]], None]
CACHE_METRIC = "ftpcluster_tls_session_cache_total"


class TwoLevelStore:
    def __init__(self, cfg: Config, l1: Any, sealer: Sealer | None, count: MetricCount) -> None:
        self.cfg = cfg
        self.l1 = l1
        self.sealer = sealer
        self.count = count
        self.ring = Ring(cfg, count=count) if (sealer is not None and cfg.memcache.enabled) else None
        self._executor: ThreadPoolExecutor | None = None
        self._writer: Ring | None = None
        self._lock = threading.Lock()
        self._from_thread: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.pending = 0
        # one per thread: the loop's reads, the store thread's list merges
        self.mac: RecordMac | None = None
        self._thread_mac: RecordMac | None = None
        if self.ring is not None and sealer is not None:
            overlap = cfg.tls.session_key_overlap
            self.mac = RecordMac(sealer.secrets, self.ring.prefix, overlap, count)
            self._thread_mac = RecordMac(sealer.secrets, self.ring.prefix, overlap, self._count_from_thread)

    @staticmethod
    def _key(session_id: bytes) -> str:
        return "tls:" + session_id.hex()

    def _count_from_thread(self, name: str, labels: tuple[str, ...]) -> None:
        with self._lock:
            self._from_thread[(name, labels)] += 1

    def _flush_counts(self) -> None:
        if self._from_thread:
            with self._lock:
                counts, self._from_thread = self._from_thread, Counter()
            for (name, labels), n in counts.items():
                for _ in range(n):
                    self.count(name, labels)

    # ------------------------------------------------------------ SessionBackend
    def lookup(self, session_id: bytes) -> bytes | None:
        self._flush_counts()
        if self.l1 is not None:
            der = self.l1.get(session_id)
            self.count(CACHE_METRIC, ("L1", "hit" if der else "miss"))
            if der:
                return der
        if self.ring is None or self.sealer is None:
            return None
        raw = self.ring.get(self._key(session_id))
        if raw is None:
            self.count(CACHE_METRIC, ("L2", "miss"))
            return None
        der = self.sealer.open(raw, aad=session_id)
        if der is None:
            self.count(CACHE_METRIC, ("L2", "error"))
            if self.mac is not None:
                self.mac.reject("tls", server_of(self.ring, self._key(session_id)))
            return None
        self.count(CACHE_METRIC, ("L2", "hit"))
        if self.l1 is not None:
            self.l1.put(session_id, der, self.cfg.tls.session_lifetime)
        return der

    def store(self, session_id: bytes, der: bytes, ttl: float) -> None:
        self._flush_counts()
        if self.l1 is not None:
            ok = self.l1.put(session_id, der, ttl)
            self.count(CACHE_METRIC, ("L1", "store" if ok else "error"))
        if self.ring is None or self.sealer is None or len(der) > MAX_ENTRY or self.pending >= MAX_PENDING:
            return
        sealed = self.sealer.seal(der, aad=session_id)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tls-store")
        with self._lock:
            self.pending += 1
        self._executor.submit(self._write, self._key(session_id), sealed, int(ttl) + 1)

    def remember_user(self, user: str, session_id: bytes) -> None:
        """Note that `user` logged in over this session, so a ban can revoke it."""
        from .tls_revoke import memcache_name, remember

        if self.l1 is None or not session_id:
            return
        packed = remember(self.l1, user, session_id, self.cfg.tls.session_lifetime)
        if self.ring is not None and self.pending < MAX_PENDING:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tls-store")
            with self._lock:
                self.pending += 1
            self._executor.submit(self._merge_ids, memcache_name(user), packed, int(self.cfg.tls.session_lifetime) + 1)

    def _write_ring(self) -> Ring:
        """The store thread's own ring (a Ring belongs to one thread)."""
        if self._writer is None:
            self._writer = Ring(self.cfg)
        return self._writer

    def _merge_ids(self, key: str, packed: bytes, ttl: int) -> None:
        """The user's list in memcached is the union of every host's (gets/cas)."""
        from .tls_revoke import pack_ids, unpack_ids

        mine, mac, ring = unpack_ids(packed), self._thread_mac, self._write_ring()
        assert mac is not None

        def merge(old: bytes | None) -> bytes:
            theirs = unpack_ids(mac.open("tlsuser", key, old, server_of(ring, key)))
            return mac.seal(key, pack_ids([i for i in theirs if i not in mine] + mine))

        ring.update(key, merge, ttl)
        with self._lock:
            self.pending -= 1

    def _write(self, key: str, sealed: bytes, ttl: int, counted: bool = True) -> None:
        """On the store thread."""
        ok = self._write_ring().set(key, sealed, ttl) > 0
        with self._lock:
            self.pending -= 1
            if counted or not ok:
                self._from_thread[(CACHE_METRIC, ("L2", "store" if ok else "error"))] += 1
