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
  and applies the removal records of bans it holds (a permit it missed).
- Local bans (made by this host's nodes or operator) are published by diffing
  the host table against what was published, so nodes need no memcached for
  bans at all.
- Everything read back is validated (size, fields, types, names), and every
  record, log entry and index shard carries a MAC under the cluster key bound
  to its key name (record_mac.py): anyone can write to memcached, so a value
  without a valid MAC is ignored and counted. A permit is a MAC'd statement
  too (a removal record under the ban's key, and a log entry), never the mere
  absence of a record: deleting keys can delay what hosts learn, not lift a
  ban. A removal names the `created` time of the ban it lifts, so replaying an
  old removal cannot lift a later ban, and a host remembers what it saw lifted
  so replaying the lifted ban's old record does not bring it back.
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
from .record_mac import RecordMac, server_of

log = structlog.get_logger("ftpcluster.ban")
trace = structlog.get_logger("ftpcluster.trace.memcache")
SHARDS = 16
LOG_TTL = 86400
MAX_VALUE = 2048
BATCH = 500
GAP_WAIT = 2.0
REMOVAL_TTL = 7 * 86400  # a removal record outlives the log: hosts that missed the entry still see it
MAX_LIFTED = 10000
MAX_RESEND = 1000  # own removals written again after memcached lost its data
FULL_EVERY = 30.0  # seconds between full reloads from the index (a safety net)
MARK_EVERY = 2.0  # seconds between looks for this host's mark (memcached emptied?)
PRUNE_BATCH = 500  # index entries of vanished records checked and dropped per full reload


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


def encode_removal(kind: str, name: str, upto: float, origin_host: str) -> bytes:
    """A permit: lifts the ban `kind:name` created at or before `upto`."""
    return json.dumps({"v": 1, "removed": True, "kind": kind, "name": name, "upto": upto, "origin_host": origin_host},
                      separators=(",", ":")).encode()  # fmt: skip


def decode_removal(d: Any) -> tuple[str, str, float] | None:
    """(kind, name, upto) of a removal (a record's or a log entry's dict), or None."""
    if not isinstance(d, dict):
        return None
    kind, name, upto = d.get("kind"), d.get("name"), d.get("upto")
    if kind not in KINDS or not isinstance(name, str) or not isinstance(upto, (int, float)) or isinstance(upto, bool):
        return None
    return kind, name, float(upto)


class BanSync:
    def __init__(self, engine: Any, ring: Ring, host_id: str, mac: RecordMac, count: Any = None) -> None:
        self.count = count or (lambda name, labels: None)
        self.mac = mac
        self.lifted: dict[tuple[str, str], float] = {}  # removals seen: (kind, name) -> upto
        self.rejected_seq = 0
        self.engine = engine  # BanEngine of the supervisor
        self.ring = ring
        self.host_id = host_id
        self.last_seq: int | None = None
        self.published: dict[tuple[str, str], float | None] = {}
        self.seen_gen = -1
        self.seen_rejoins = 0
        self.dirty = False  # a write that no server took: redo it when servers answer
        self.pending_removals: dict[tuple[str, str], float] = {}  # -> upto
        self.pending_log: list[dict[str, Any]] = []
        self.removed_here: dict[tuple[str, str], tuple[float, float]] = {}  # own permits -> (upto, when)
        self.sync_rejoins = 0  # ring.rejoins when sync() last looked: a rejoin forces a full load
        self.next_full = 0.0
        self.applied = 0
        self.gap_since: float | None = None
        self.next_mark = 0.0  # when sync() next looks for this host's mark (see there)
        engine.on_change.append(self._on_change)

    # ------------------------------------------------------------ writing
    def _on_change(self, op: str, ban: Ban) -> None:
        if op == "add" and ban.origin == "local":
            self.publish(ban)
        elif op == "remove":
            self.unpublish(ban.kind, ban.name, ban.created or time.time())

    def publish(self, ban: Ban) -> None:
        ttl = 0 if ban.expires_at is None else max(1, int(ban.expires_at - time.time()) + 1)
        key = f"ban:{ban.kind}:{ban.name}"
        if self.ring.set(key, self.mac.seal(key, encode(ban)), ttl) == 0:
            self.dirty = True  # no server took it: published again once one answers
            return
        self.published[(ban.kind, ban.name)] = ban.expires_at
        self._index_update(ban.kind, ban.name, add=True)
        self._log({"op": "add", "ban": json.loads(encode(ban))})
        trace.debug("ban published", ban_kind=ban.kind, ban=ban.name)

    def unpublish(self, kind: str, name: str, upto: float) -> None:
        self.published.pop((kind, name), None)
        self._remember_lifted(kind, name, upto)
        if not self.ring.any_up():
            self.pending_removals[(kind, name)] = upto
            self.dirty = True
            return
        self.pending_removals.pop((kind, name), None)
        prev = self.removed_here.pop((kind, name), None)  # a resend keeps its time: it ages out
        self.removed_here[(kind, name)] = (upto, prev[1] if prev and prev[0] == upto else time.time())
        while len(self.removed_here) > MAX_RESEND:
            del self.removed_here[next(iter(self.removed_here))]
        key = f"ban:{kind}:{name}"
        if self.ring.set(key, self.mac.seal(key, encode_removal(kind, name, upto, self.host_id)), REMOVAL_TTL) == 0:
            self.pending_removals[(kind, name)] = upto  # any_up() was not yet told of an outage
            self.dirty = True
            return
        self._index_update(kind, name, add=False)
        self._log({"op": "remove", "kind": kind, "name": name, "upto": upto, "origin_host": self.host_id})

    def _index_update(self, kind: str, name: str, add: bool) -> None:
        entry = {f"{kind}:{name}"}
        self._edit_index(f"banidx:{_shard(kind, name)}", add=entry if add else set(), drop=set() if add else entry)

    def _edit_index(self, shard: str, add: set[str], drop: set[str], recheck: bool = False) -> None:
        """Add and drop entries of one index shard (gets/cas on every replica). With
        `recheck`, an entry is dropped only if its record is still missing when asked
        between this replica's gets and its cas: a host that writes the record again
        meanwhile has written it before its own index cas, so either this cas fails
        (and the check runs again) or that host's cas comes after and adds the entry."""

        def change(raw: bytes | None) -> bytes:
            items = _index_parse(self.mac.open("banidx", shard, raw, server_of(self.ring, shard)))
            gone = drop & items
            if recheck and gone:
                gone = {name[4:] for name in self.ring.missing(f"ban:{e}" for e in sorted(gone))}
            return self.mac.seal(shard, json.dumps(sorted((items | add) - gone)).encode())

        self.ring.update(shard, change)

    def _log(self, entry: dict[str, Any]) -> None:
        seq = self.ring.incr("banseq", 1)
        name = f"banlog:{seq}"
        if seq is None or not self.ring.set(name, self.mac.seal(name, json.dumps(entry, separators=(",", ":")).encode()), LOG_TTL):
            self.pending_log.append(entry)  # written again when a server answers
            self.dirty = True

    def republish_all(self) -> None:
        """memcached lost its data (restart, rejoin): write every local ban again, and the
        removal records of this host's recent permits (a host that still holds the ban
        and reads the index after the restart learns of the permit only from its record)."""
        self.published.clear()
        self.seen_gen = -1
        now = time.time()
        for key, (upto, when) in self.removed_here.items():
            if now - when < REMOVAL_TTL:
                self.pending_removals.setdefault(key, upto)
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
        for (kind, name), upto in list(self.pending_removals.items()):
            self.unpublish(kind, name, upto)
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
        raw = self.ring.get("banseq", next_on_miss=False)  # the counter: first live replica only
        if raw is None and not self.ring.any_up():
            return
        try:
            seq = int(raw or 0)
        except ValueError:  # not a counter (written by someone else): counted, then started again
            self.mac.reject("banlog", server_of(self.ring, "banseq"))
            self.ring.delete("banseq")
            seq = 0
        now = time.monotonic()
        if self.last_seq and seq < self.last_seq:
            self.republish_all()  # the counter went back: the servers were emptied
        elif now >= self.next_mark:
            # This host's mark gone from every server (all of them answering) means they
            # were emptied too, also when a ban made right after has already taken the
            # counter back past where this host had read it.
            self.next_mark = now + MARK_EVERY
            mark = f"banmark:{self.host_id}"
            if mark in self.ring.missing([mark]):
                if self.last_seq is not None:
                    self.republish_all()
                self.ring.set(mark, b"1", 0)
        if self.ring.rejoins != self.sync_rejoins:
            # A server came back, maybe empty: the counter may have restarted and already
            # be back at (or past) last_seq with other entries, which the log cannot tell.
            self.sync_rejoins, self.next_full = self.ring.rejoins, 0.0
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
                payload = self._open_log(n, got.get(n))
                if payload is None:  # missing, or forged (the real entry may still overwrite it)
                    break
                self._apply(payload)
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

    def _open_log(self, name: str, raw: bytes | None) -> bytes | None:
        if raw is None:
            return None
        payload = self.mac.verify(name, raw)
        if payload is None:
            seq = int(name.rpartition(":")[2])
            if seq != self.rejected_seq:  # read again until the gap wait ends: count it once
                self.rejected_seq = seq
                self.mac.reject("banlog", server_of(self.ring, name))
        return payload

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
            removal = decode_removal(entry)
            if removal is not None:
                self._lift(*removal)

    def _remember_lifted(self, kind: str, name: str, upto: float) -> None:
        key = (kind, name)
        self.lifted[key] = max(upto, self.lifted.pop(key, upto))
        while len(self.lifted) > MAX_LIFTED:
            del self.lifted[next(iter(self.lifted))]

    def _lift(self, kind: str, name: str, upto: float, current: Ban | None = None) -> bool:
        """Apply a removal: only to the ban it named (created at or before `upto`)."""
        self._remember_lifted(kind, name, upto)
        if current is None:
            current = next((b for b in self.engine.active() if b.kind == kind and b.name == name), None)
        if current is None or current.created > upto:
            return False
        self.engine.table.remove(kind, name)
        self.published.pop((kind, name), None)
        return True

    def _put(self, ban: Ban) -> None:
        if ban.created <= self.lifted.get((ban.kind, ban.name), float("-inf")):
            return  # an old record of a ban that was lifted (a replay)
        current = self.engine.view.users.get(ban.name) if ban.kind in ("user", "userhost") else None
        if current is not None and current.expires_at == ban.expires_at:
            return
        if self.engine.table.add(ban):
            self.applied += 1
            self.count("ftpcluster_bans_added_total", ("user" if ban.kind == "userhost" else ban.kind, "cluster"))

    def _read_index(self, reseal: bool = False) -> set[str]:
        """Every entry of every shard. With `reseal`, a shard still sealed under a
        retired key (a key rotation) is sealed again under the current one: the hosts
        republish their own bans after a reload, but a shard no ban of theirs touches
        would otherwise be refused (and counted as forged) once the overlap ends."""
        entries: set[str] = set()
        for i in range(SHARDS):
            name = f"banidx:{i}"
            raw = self.ring.get(name)
            payload = self.mac.open("banidx", name, raw, server_of(self.ring, name))
            entries |= _index_parse(payload)
            if reseal and payload is not None and self.mac.retired(raw):
                self._edit_index(name, add=set(), drop=set())
        return entries

    def _read_records(self, names: Any) -> dict[str, Any]:
        """Verified ban records by key name: a Ban, or a removal (kind, name, upto)."""
        out: dict[str, Any] = {}
        for name, raw in self.ring.get_many(names).items():
            payload = self.mac.open("ban", name, raw, server_of(self.ring, name))
            if payload is None:
                continue
            item: Any = decode(payload)
            if item is None and b'"removed":true' in payload:  # rare: parse again as a removal
                try:
                    item = decode_removal(json.loads(payload))
                except ValueError:
                    continue
            if item is not None:
                out[name] = item
        return out

    def full_load(self) -> None:
        """Every ban the cluster has in force, and the removals of bans this host still holds.
        A ban whose record is simply gone stays until it expires: only a MAC'd removal lifts it."""
        entries = self._read_index(reseal=True)
        got = self._read_records(f"ban:{e}" for e in entries) if entries else {}
        gone = entries - {name[4:] for name in got}
        if gone:
            self._prune_index(gone)
        live: set[tuple[str, str]] = set()
        for item in got.values():
            if isinstance(item, Ban):
                live.add((item.kind, item.name))
                if item.origin_host != self.host_id:
                    self._put(item)
        if not self.ring.any_up():
            return
        # Bans held here that the index no longer names (a permit elsewhere, or keys an
        # attacker deleted): ask for their records; a removal lifts, nothing else does.
        held = {f"ban:{b.kind}:{b.name}": b for b in self.engine.active()
                if (b.kind, b.name) not in live and (b.origin == "cluster" or (b.kind, b.name) in self.published)}  # fmt: skip
        for name, item in (self._read_records(held) if held else {}).items():
            if isinstance(item, tuple):
                self._lift(*item, current=held[name])
        (log.info if self.last_seq is None else trace.debug)("cluster bans loaded", count=len(live))

    def _prune_index(self, gone: set[str]) -> None:
        """Drop index entries whose record every replica confirms is gone (expired bans,
        removal records past REMOVAL_TTL), so the index does not grow with every ban
        ever made. Only when every server answers (Ring.missing), and each entry is
        checked again inside the index's gets/cas (`recheck`): a ban published again
        meanwhile keeps its entry."""
        names = [f"ban:{e}" for e in sorted(gone)[:PRUNE_BATCH]]
        absent = self.ring.missing(names)
        by_shard: dict[str, set[str]] = {}
        for name in absent:
            kind, _, ban_name = name[4:].partition(":")
            by_shard.setdefault(f"banidx:{_shard(kind, ban_name)}", set()).add(name[4:])
        for shard, drop in by_shard.items():
            self._edit_index(shard, add=set(), drop=drop, recheck=True)
        if absent:
            trace.debug("ban index pruned", entries=len(absent))

    def cluster_bans(self) -> list[dict[str, Any]]:
        """For `bans --json`: bans that exist in memcached (origin cluster)."""
        entries = self._read_index()
        got = self._read_records(f"ban:{e}" for e in entries) if entries else {}
        return [b.to_json() for b in got.values() if isinstance(b, Ban)]


def _index_parse(raw: bytes | None) -> set[str]:
    if not raw or len(raw) > 1_000_000:
        return set()
    try:
        items = json.loads(raw)
    except ValueError:
        return set()
    return {x for x in items if isinstance(x, str) and len(x) < 200} if isinstance(items, list) else set()

