"""Bans across hosts through memcached, run by each host's supervisor.

Design (the connection path never talks to memcached; it reads the host table):
- Every ban in force is a key `ban:<kind>:<name>` on `replicas` servers, a JSON
  value (kind, name, reason, origin host, created, expiry), TTL = time left.
- A change log makes propagation cheap: `banseq` is a counter; each change
  (add or remove) is written as `banlog:<seq>`. Every sync interval (0.2 s)
  each supervisor reads `banseq` and fetches only the entries it has not seen,
  then writes them into its host table, where nodes see them within 0.25 s.
- A sharded index (`banidx:<0..15>`, updated with gets/cas) names every ban key,
  so a host that starts later, or finds a gap in the log (evicted entries, a
  counter that went back after a failover), reloads every ban still in force
  and drops cluster bans that are gone (a permit it missed).
- Local bans (made by this host's nodes or operator) are published by diffing
  the host table against what was published, so nodes need no memcached for
  bans at all.
- Everything read back is validated (size, fields, types, names): the cache is
  not trusted input.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import structlog

from .ban_names import BanNameError, validate_ban_name
from .ban_table import KINDS, Ban
from .memcache_ring import Ring

log = structlog.get_logger("ftpcluster.ban")
trace = structlog.get_logger("ftpcluster.trace.memcache")
SHARDS = 16
LOG_TTL = 86400
MAX_VALUE = 2048
BATCH = 500
GAP_WAIT = 2.0
FULL_EVERY = 30.0  # seconds between full reloads from the index (a safety net)  # seconds a missing log entry may take to appear before a full reload


def _shard(kind: str, name: str) -> int:
    return hashlib.blake2b(f"{kind}:{name}".encode(), digest_size=2).digest()[0] % SHARDS


def encode(ban: Ban) -> bytes:
    return json.dumps(
        {"v": 1, "kind": ban.kind, "name": ban.name, "reason": ban.reason, "origin_host": ban.origin_host,
         "created": ban.created, "expires_at": ban.expires_at, "manual": ban.manual},  # fmt: skip
        separators=(",", ":"),
    ).encode()


def decode(raw: Any, now: float | None = None) -> Ban | None:
    """A ban from the cache, or None for anything malformed, foreign or expired."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_VALUE:
        return None
    try:
        d = json.loads(raw)
        kind, name, exp = d["kind"], d["name"], d["expires_at"]
        reason, ohost, created = d.get("reason", ""), d.get("origin_host", ""), d.get("created", 0.0)
        if d.get("v") != 1 or kind not in KINDS or not isinstance(name, str) or not isinstance(reason, str):
            return None
        if not isinstance(ohost, str) or not isinstance(created, (int, float)) or isinstance(created, bool):
            return None
        if exp is not None and (not isinstance(exp, (int, float)) or isinstance(exp, bool)):
            return None
        check_kind = "user" if kind == "userhost" else kind
        if validate_ban_name(check_kind, name) != name:
            return None
    except (ValueError, KeyError, TypeError, BanNameError):
        return None
    now = time.time() if now is None else now
    if exp is not None and exp <= now:
        return None
    return Ban(kind, name, float(exp) if exp is not None else None, reason[:96], "cluster", float(created),
               bool(d.get("manual")), ohost[:32])  # fmt: skip


class BanSync:
    def __init__(self, engine: Any, ring: Ring, host_id: str, count: Any = None) -> None:
        self.count = count or (lambda name, labels: None)
        self.engine = engine  # BanEngine of the supervisor
        self.ring = ring
        self.host_id = host_id
        self.last_seq: int | None = None
        self.published: dict[tuple[str, str], float | None] = {}
        self.seen_gen = -1
        self.seen_rejoins = 0
        self.dirty = False  # a write that no server took: redo it when servers answer
        self.pending_removals: set[tuple[str, str]] = set()
        self.pending_log: list[dict[str, Any]] = []
        self.next_full = 0.0
        self.applied = 0
        self.gap_since: float | None = None
        engine.on_change.append(self._on_change)

    # ------------------------------------------------------------ writing
    def _on_change(self, op: str, ban: Ban) -> None:
        if op == "add" and ban.origin == "local":
            self.publish(ban)
        elif op == "remove":
            self.unpublish(ban.kind, ban.name)

    def publish(self, ban: Ban) -> None:
        ttl = 0 if ban.expires_at is None else max(1, int(ban.expires_at - time.time()) + 1)
        key = f"ban:{ban.kind}:{ban.name}"
        if self.ring.set(key, encode(ban), ttl) == 0:
            self.dirty = True  # no server took it: published again once one answers
            return
        self.published[(ban.kind, ban.name)] = ban.expires_at
        entry = f"{ban.kind}:{ban.name}"
        self.ring.update(f"banidx:{_shard(ban.kind, ban.name)}", lambda v: _index_add(v, entry))
        self._log({"op": "add", "ban": json.loads(encode(ban))})
        trace.debug("ban published", ban_kind=ban.kind, ban=ban.name)

    def unpublish(self, kind: str, name: str) -> None:
        self.published.pop((kind, name), None)
        if not self.ring.any_up():
            self.pending_removals.add((kind, name))
            self.dirty = True
            return
        self.pending_removals.discard((kind, name))
        self.ring.delete(f"ban:{kind}:{name}")
        entry = f"{kind}:{name}"
        self.ring.update(f"banidx:{_shard(kind, name)}", lambda v: _index_remove(v, entry))
        self._log({"op": "remove", "kind": kind, "name": name, "origin_host": self.host_id})

    def _log(self, entry: dict[str, Any]) -> None:
        seq = self.ring.incr("banseq", 1)
        if seq is None or not self.ring.set(f"banlog:{seq}", json.dumps(entry, separators=(",", ":")).encode(), LOG_TTL):
            self.pending_log.append(entry)  # written again when a server answers
            self.dirty = True

    def republish_all(self) -> None:
        """memcached lost its data (restart, rejoin): write every local ban again."""
        self.published.clear()
        self.seen_gen = -1
        log.info("republishing local bans to memcached")

    def publish_local(self) -> None:
        """Publish local bans the nodes added since the last look (cheap when none),
        and whatever an outage kept from being written."""
        if self.ring.rejoins != self.seen_rejoins:
            self.seen_rejoins = self.ring.rejoins
            self.republish_all()
        gen = self.engine.table.generation()
        if gen == self.seen_gen and not (self.dirty and self.ring.any_up()):
            return
        self.seen_gen, self.dirty = gen, False
        for kind, name in list(self.pending_removals):
            self.unpublish(kind, name)
        retry, self.pending_log = self.pending_log[-1000:], []
        for entry in retry:
            self._log(entry)
        now = time.time()
        for b in self.engine.active():
            if b.origin == "local" and self.published.get((b.kind, b.name), -1) != b.expires_at:
                self.publish(b)
        for key, exp in list(self.published.items()):
            if exp is not None and exp <= now:
                del self.published[key]

    # ------------------------------------------------------------ reading
    def sync(self) -> None:
        raw = self.ring.get("banseq")
        if raw is None and not self.ring.any_up():
            return
        try:
            seq = int(raw or 0)
        except ValueError:
            return
        if raw is None and self.last_seq:
            self.republish_all()  # the counter vanished: the servers were emptied
        now = time.monotonic()
        if self.last_seq is None or seq < self.last_seq or now >= self.next_full:
            # Also every FULL_EVERY seconds: whatever a log entry lost during a partial
            # outage did not carry, the index does.
            self.full_load()
            self.last_seq, self.next_full = seq, now + FULL_EVERY
            return
        while self.last_seq < seq:
            upto = min(seq, self.last_seq + BATCH)
            names = [f"banlog:{i}" for i in range(self.last_seq + 1, upto + 1)]
            got = self.ring.get_many(names)
            for n in names:
                if n not in got:
                    break
                self._apply(got[n])
                self.last_seq += 1
            else:
                self.gap_since = None
                continue
            # An entry is missing: just incremented and not yet written (wait a
            # little), or evicted/lost (then the index has the truth).
            now = time.monotonic()
            if self.gap_since is None:
                self.gap_since = now
            elif now - self.gap_since > GAP_WAIT:
                self.full_load()
                self.last_seq, self.gap_since = seq, None
            return

    def _apply(self, raw: bytes) -> None:
        try:
            entry = json.loads(raw)
        except ValueError:
            return
        if not isinstance(entry, dict):
            return
        if entry.get("op") == "add":
            ban = decode(json.dumps(entry.get("ban")).encode())
            if ban is not None and ban.origin_host != self.host_id:
                self._put(ban)
        elif entry.get("op") == "remove" and entry.get("origin_host") != self.host_id:
            kind, name = entry.get("kind"), entry.get("name")
            if kind in KINDS and isinstance(name, str):
                self.engine.table.remove(kind, name)

    def _put(self, ban: Ban) -> None:
        current = self.engine.view.users.get(ban.name) if ban.kind in ("user", "userhost") else None
        if current is not None and current.expires_at == ban.expires_at:
            return
        if self.engine.table.add(ban):
            self.applied += 1
            self.count("ftpcluster_bans_added_total", ("user" if ban.kind == "userhost" else ban.kind, "cluster"))

    def full_load(self) -> None:
        """Every ban the cluster has in force; cluster bans it no longer has are dropped."""
        entries: set[str] = set()
        for i in range(SHARDS):
            raw = self.ring.get(f"banidx:{i}")
            entries |= _index_parse(raw)
        got = self.ring.get_many(f"ban:{e}" for e in entries) if entries else {}
        live: set[tuple[str, str]] = set()
        for name, raw in got.items():
            ban = decode(raw)
            if ban is None:
                continue
            live.add((ban.kind, ban.name))
            if ban.origin_host != self.host_id:
                self._put(ban)
        if not self.ring.any_up():
            return  # do not drop anything on an outage
        for b in self.engine.active():
            gone = (b.kind, b.name) not in live
            if gone and b.origin == "local":  # the index may lag: ask for the key itself
                gone = (b.kind, b.name) in self.published and self.ring.get(f"ban:{b.kind}:{b.name}") is None
            # Cluster bans no longer in the cluster, and local ones we published that
            # someone lifted (a permit on another host) are dropped here too.
            if gone and (b.origin == "cluster" or (b.kind, b.name) in self.published):
                self.engine.table.remove(b.kind, b.name)
                self.published.pop((b.kind, b.name), None)
        (log.info if self.last_seq is None else trace.debug)("cluster bans loaded", count=len(live))

    def cluster_bans(self) -> list[dict[str, Any]]:
        """For `bans --json`: bans that exist in memcached (origin cluster)."""
        out = []
        entries: set[str] = set()
        for i in range(SHARDS):
            entries |= _index_parse(self.ring.get(f"banidx:{i}"))
        for _, raw in (self.ring.get_many(f"ban:{e}" for e in entries) if entries else {}).items():
            ban = decode(raw)
            if ban is not None:
                out.append(ban.to_json())
        return out


def _index_parse(raw: bytes | None) -> set[str]:
    if not raw or len(raw) > 1_000_000:
        return set()
    try:
        items = json.loads(raw)
    except ValueError:
        return set()
    return {x for x in items if isinstance(x, str) and len(x) < 200} if isinstance(items, list) else set()


def _index_add(raw: bytes | None, entry: str) -> bytes:
    items = _index_parse(raw)
    items.add(entry)
    return json.dumps(sorted(items)).encode()


def _index_remove(raw: bytes | None, entry: str) -> bytes:
    items = _index_parse(raw)
    items.discard(entry)
    return json.dumps(sorted(items)).encode()
