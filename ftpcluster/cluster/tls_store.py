"""The two-level TLS session store behind the native session-cache hooks.

L1 is the host's shared memory (every node of a host, microseconds). L2 is
memcached (every host), reached only through the node's memcached thread
(memcache_thread.py), never from the event loop: the OpenSSL callbacks, which
run inside a handshake on the loop, read and write L1 only. New sessions go to
L1 at once and to L2 as a job on the thread. A session another host made is
brought into L1 before the handshake by `prefetch` (driven by the ClientHello,
see worker/tls_prefetch.py), which waits for the thread at most until a
deadline; after it the handshake is simply a full one.

Entries in memcached hold the master secret, so they are sealed (AES-GCM under
the cluster key, the session id as associated data): whoever reads memcached
reads nothing, and an entry moved to another id does not open. A value that
fails to open is a miss (counted as rejected, kind "tls"). Entries are bounded
(`MAX_ENTRY`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any, Callable

from ..config import Config
from .memcache_ring import key_prefix
from .record_mac import RecordMac, server_of
from .session_seal import Sealer
from .tls_revoke import memcache_name, pack_ids, remember, revoked, unpack_ids

MAX_ENTRY = 10 * 1024
MAX_PENDING = 2000
MetricCount = Callable[[str, tuple[str, ...]], None]
CACHE_METRIC = "ftpcluster_tls_session_cache_total"


class TwoLevelStore:
    def __init__(self, cfg: Config, l1: Any, sealer: Sealer | None, count: MetricCount, remote: Any = None) -> None:
        self.cfg = cfg
        self.l1 = l1
        self.sealer = sealer
        self.count = count
        # the node's MemcacheThread; None without memcached or without the cluster key
        self.remote = remote if (sealer is not None and cfg.memcache.enabled) else None
        self._lock = threading.Lock()
        self._from_thread: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.pending = 0
        # used on the memcached thread only (its counts reach the loop through flush_counts)
        self.mac: RecordMac | None = None
        if self.remote is not None and sealer is not None:
            self.mac = RecordMac(sealer.secrets, key_prefix(cfg), cfg.tls.session_key_overlap, self._count_from_thread)

    @staticmethod
    def _key(session_id: bytes) -> str:
        return "tls:" + session_id.hex()

    def _count_from_thread(self, name: str, labels: tuple[str, ...]) -> None:
        with self._lock:
            self._from_thread[(name, labels)] += 1

    def flush_counts(self) -> None:
        if self._from_thread:
            with self._lock:
                counts, self._from_thread = self._from_thread, Counter()
            for (name, labels), n in counts.items():
                for _ in range(n):
                    self.count(name, labels)

    # ------------------------------------------------------------ SessionBackend (on the loop)
    def lookup(self, session_id: bytes) -> bytes | None:
        """L1 only: called by OpenSSL inside the handshake."""
        self.flush_counts()
        if self.l1 is None:
            return None
        der = self.l1.get(session_id)
        self.count(CACHE_METRIC, ("L1", "hit" if der else "miss"))
        return der

    def store(self, session_id: bytes, der: bytes, ttl: float) -> None:
        self.flush_counts()
        if self.l1 is not None:
            ok = self.l1.put(session_id, der, ttl)
            self.count(CACHE_METRIC, ("L1", "store" if ok else "error"))
        if self.remote is None or self.sealer is None or len(der) > MAX_ENTRY or self.pending >= MAX_PENDING:
            return
        sealed = self.sealer.seal(der, aad=session_id)
        self._submit(lambda ring: self._write(ring, self._key(session_id), sealed, int(ttl) + 1))

    def _submit(self, job: Callable[[Any], None]) -> None:
        with self._lock:
            self.pending += 1
        self.remote.submit(job).add_done_callback(self._done)

    def _done(self, _fut: Any) -> None:
        with self._lock:
            self.pending -= 1

    # ------------------------------------------------------------ prefetch (from the loop)
    async def prefetch(self, ids: list[bytes], until: float) -> str:
        """Bring the sessions `ids` into L1 from memcached unless L1 has one already;
        wait until `until` (monotonic) at most. none | l1 | fetched | miss | timeout."""
        if self.l1 is None or self.remote is None:
            return "none"
        if any(self.l1.get(i) for i in ids):
            return "l1"
        job = self.remote.submit(lambda ring: self._fetch(ring, ids), deadline=until)
        try:
            got = await asyncio.wait_for(asyncio.wrap_future(job), max(0.0, until - time.monotonic()))
        except (asyncio.TimeoutError, Exception):
            self.count(CACHE_METRIC, ("L2", "timeout"))
            return "timeout"
        finally:
            self.flush_counts()
        return "fetched" if got else "miss"

    def _fetch(self, ring: Any, ids: list[bytes]) -> bool:
        """On the memcached thread: the sealed entries, opened, into L1."""
        got = ring.get_many(self._key(i) for i in ids)
        found = False
        for sid in ids:
            raw = got.get(self._key(sid))
            der = self.sealer.open(raw, aad=sid) if (raw is not None and self.sealer is not None) else None
            result = "miss" if raw is None else ("error" if der is None else "hit")
            self._count_from_thread(CACHE_METRIC, ("L2", result))
            if result == "error" and self.mac is not None:
                self.mac.reject("tls", server_of(ring, self._key(sid)))
            if der is not None:
                self.l1.put(sid, der, self.cfg.tls.session_lifetime)
                if revoked(self.l1, sid):  # after the put: a revocation racing this fetch (tls_revoke)
                    self.l1.delete(sid)
                    self._count_from_thread(CACHE_METRIC, ("L2", "revoked"))
                    continue
                found = True
        return found

    def remember_user(self, user: str, session_id: bytes) -> None:
        """Note that `user` logged in over this session, so a ban can revoke it."""
        if self.l1 is None or not session_id:
            return
        packed = remember(self.l1, user, session_id, self.cfg.tls.session_lifetime)
        if packed is not None and self.remote is not None and self.pending < MAX_PENDING:
            key, ttl = memcache_name(user), int(self.cfg.tls.session_lifetime) + 1
            self._submit(lambda ring: self._merge_ids(ring, key, packed, ttl))

    def _merge_ids(self, ring: Any, key: str, packed: bytes, ttl: int) -> None:
        """The user's list in memcached is the union of every host's (gets/cas)."""
        mine, mac = unpack_ids(packed), self.mac
        assert mac is not None

        def merge(old: bytes | None) -> bytes:
            theirs = unpack_ids(mac.open("tlsuser", key, old, server_of(ring, key)))
            return mac.seal(key, pack_ids([i for i in theirs if i not in mine] + mine))

        ring.update(key, merge, ttl)

    def _write(self, ring: Any, key: str, sealed: bytes, ttl: int) -> None:
        """On the memcached thread."""
        ok = ring.set(key, sealed, ttl) > 0
        self._count_from_thread(CACHE_METRIC, ("L2", "store" if ok else "error"))
