"""The host's ban table in shared memory: every node reads it on each connection
and at login; nodes (automatic bans) and the supervisor (manual and cluster bans)
write it.

Why this shape:
- Readers never lock. Each record carries a CRC32, so a record torn by a writer
  killed with SIGKILL mid-write is simply not a record (ProFTPD's SysV table with
  flock can be left locked; a POSIX semaphore can be left taken).
- Writers serialize on an fcntl lock, which the kernel drops when the holder
  dies, so a node killed at any instant never wedges the table.
- A generation counter bumped after every record written lets each reader
  keep a parsed copy (dicts and a network list): a lookup for a client that is
  not banned is a counter read and two dict probes, about a microsecond.
- A change log (a ring of the last LOG_SIZE record numbers written, each
  tagged with its generation) lets a reader that is behind re-read only the
  records that changed: during a burst of thousands of bans a new connection
  costs microseconds, not a parse of the whole table (17.8 ms at 5,000 bans).
  A reader further behind than the ring, or that finds an entry overwritten,
  parses the whole table as before.
- The generation and the high-water mark are single aligned stores (a
  memoryview of 'Q' / 'I'): `struct.pack_into` zero-fills before writing, so
  a reader could see generation 0 or an empty table for an instant.
- Size comes from `[ban] table_size`. When it is full, expired records are
  reused first, then the automatic ban that ends soonest is replaced; if every
  record is a permanent or manual ban the new ban is refused (add returns
  False and the caller logs and counts it).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import mmap
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .shm_file import map_shared

MAGIC = b"FTPCBAN2"
HEADER = struct.Struct("<8sIIQ")  # magic, capacity, high-water mark, generation
GEN_OFF = 16
HWM_WORD = 3  # the high-water mark as the 4th 32-bit word
GEN_WORD = GEN_OFF // 8
PENDING_WORD = GEN_WORD + 1  # 1 + the record a writer is writing, 0 when none: a writer that
# died between its record and the log entry is logged by the next one (readers then re-read it)
LOG_OFF = HEADER.size + 8
LOG_SIZE = 8192  # change-log entries: (generation & 0xffffffff) << 32 | record number
TORN_RETRIES = 50  # re-reads of a record whose CRC fails while a live writer may be mid-copy
# crc, kind, origin, manual, pad, expires (0 = never), created, name, reason, origin host
RECORD = struct.Struct("<IBBBxdd80s96s32s")
REC_SIZE = 256
KINDS = {"host": 1, "user": 2, "userhost": 3, "class": 4}
KIND_NAMES = {v: k for k, v in KINDS.items()}
ORIGINS = {"local": 1, "cluster": 2}
ORIGIN_NAMES = {v: k for k, v in ORIGINS.items()}
# fcntl locks are per process: two threads of one process (the supervisor's loop and
# its cluster sync thread) also take this lock. Held across fork() by the forking
# thread only, so a child never inherits it taken by a thread it does not have.
_THREAD_LOCK = threading.Lock()
os.register_at_fork(before=_THREAD_LOCK.acquire, after_in_parent=_THREAD_LOCK.release,
                    after_in_child=_THREAD_LOCK.release)  # fmt: skip


@dataclass(frozen=True)
class Ban:
    kind: str  # host | user | userhost | class
    name: str  # normalised (see ban_names)
    expires_at: float | None  # unix seconds, None = permanent
    reason: str = ""
    origin: str = "local"  # local | cluster
    created: float = 0.0
    manual: bool = False
    origin_host: str = ""

    def active(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now

    def to_json(self) -> dict[str, object]:
        kind = "user" if self.kind == "userhost" else self.kind
        return {
            "kind": kind, "name": self.name, "expires_at": self.expires_at, "reason": self.reason,
            "origin": self.origin, "created": self.created, "manual": self.manual, "origin_host": self.origin_host,
        }  # fmt: skip


def _enc(s: str, n: int) -> bytes:
    b = s.encode("utf-8")[:n]
    return b.decode("utf-8", "ignore").encode("utf-8")  # never cut a character in half


class BanTable:
    def __init__(self, path: Path, capacity: int = 65536, create: bool = False) -> None:
        self.path = Path(path)
        self.capacity = capacity
        self.base = LOG_OFF + LOG_SIZE * 8
        size = self.base + capacity * REC_SIZE
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        self.mm, self.fd = map_shared(self.path, size, create, wipe=False, mismatch="size differs from [ban] table_size")
        self.words = memoryview(self.mm).cast("Q")  # one aligned 8-byte load or store per item
        self.words32 = memoryview(self.mm).cast("I")
        self._idx_gen = -1
        self._idx: dict[tuple[str, str], int] = {}
        self._slot_key: dict[int, tuple[str, str]] = {}
        self._empty: set[int] = set()
        self._expired: set[int] = set()
        if create:
            with self.locked():
                magic, cap, _, _ = HEADER.unpack_from(self.mm, 0)
                if magic != MAGIC or cap != capacity:
                    self.mm[: self.base] = b"\0" * self.base
                    HEADER.pack_into(self.mm, 0, MAGIC, capacity, 0, 1)
        magic, cap, _, _ = HEADER.unpack_from(self.mm, 0)
        if magic != MAGIC or cap != capacity:
            raise ValueError(f"{self.path}: not a ban table of this size")

    # ------------------------------------------------------------ low level
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with _THREAD_LOCK:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                pending = self.words[PENDING_WORD]
                if pending:  # the previous writer was killed mid-write
                    self._publish(pending - 1)
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def generation(self) -> int:
        return self.words[GEN_WORD]

    def _hwm(self) -> int:
        return min(self.words32[HWM_WORD], self.capacity)

    def _set_hwm(self, hwm: int) -> None:
        """Raised before the record it admits is written (a reader then sees an empty record)."""
        if hwm != self.words32[HWM_WORD]:
            self.words32[HWM_WORD] = hwm

    def changes(self, since: int, upto: int) -> set[int] | None:
        """Record numbers written between generations `since` (exclusive) and `upto`
        (inclusive), from the change log; None when the log no longer covers them
        (the reader must parse the whole table)."""
        if since < 0 or upto < since or upto - since >= LOG_SIZE:
            return None
        words, base = self.words, LOG_OFF // 8
        out = set()
        for g in range(since + 1, upto + 1):
            entry = words[base + g % LOG_SIZE]
            if entry >> 32 != g & 0xFFFFFFFF:
                return None  # overwritten by a writer LOG_SIZE changes ahead
            out.add(entry & 0xFFFFFFFF)
        return out

    def _read(self, i: int) -> Ban | None:
        off = self.base + i * REC_SIZE
        for _ in range(TORN_RETRIES):
            raw = self.mm[off : off + RECORD.size]
            crc, kind, origin, manual, expires, created, name, reason, ohost = RECORD.unpack(raw)
            if kind == 0:
                return None  # free
            if crc == zlib.crc32(raw[4:]):
                break
        else:
            return None  # torn by a writer that died mid-write
        return Ban(
            KIND_NAMES.get(kind, "host"), name.rstrip(b"\0").decode("utf-8", "replace"), expires or None,
            reason.rstrip(b"\0").decode("utf-8", "replace"), ORIGIN_NAMES.get(origin, "local"), created,
            bool(manual), ohost.rstrip(b"\0").decode("utf-8", "replace"),
        )  # fmt: skip

    def _write(self, i: int, ban: Ban | None) -> None:
        """Write record `i` (call under the lock), then log it, then publish the
        generation: a reader that sees the new generation sees the record."""
        off = self.base + i * REC_SIZE
        self.words[PENDING_WORD] = i + 1
        if ban is None:
            self.mm[off : off + RECORD.size] = b"\0" * RECORD.size
        else:
            body = RECORD.pack(
                0, KINDS[ban.kind], ORIGINS.get(ban.origin, 1), int(ban.manual), ban.expires_at or 0.0, ban.created,
                _enc(ban.name, 80), _enc(ban.reason, 96), _enc(ban.origin_host, 32),
            )[4:]  # fmt: skip
            self.mm[off : off + RECORD.size] = struct.pack("<I", zlib.crc32(body)) + body
        self._publish(i)

    def _bump(self) -> None:
        """A new generation with no usable log entry: every reader parses the whole
        table again (for tests and repairs that change bytes behind the writers' back)."""
        gen = self.words[GEN_WORD] + 1
        self.words[LOG_OFF // 8 + gen % LOG_SIZE] = ((gen + 1) & 0xFFFFFFFF) << 32  # a tag that never matches
        self.words[GEN_WORD] = gen

    def _publish(self, i: int) -> None:
        gen = self.words[GEN_WORD] + 1
        self.words[LOG_OFF // 8 + gen % LOG_SIZE] = (gen & 0xFFFFFFFF) << 32 | i
        self.words[GEN_WORD] = gen
        self.words[PENDING_WORD] = 0

    # ------------------------------------------------------------ reading
    def snapshot(self) -> tuple[int, list[Ban]]:
        """(generation, every record) read without a lock."""
        gen, records = self.records()
        return gen, list(records.values())

    def records(self) -> tuple[int, dict[int, Ban]]:
        """(generation, record number -> ban) read without a lock. A writer that
        moves on meanwhile is fine: the generation read first is older than its
        writes, so a reader re-reads them from the change log."""
        gen = self.generation()
        return gen, {i: b for i, b in ((i, self._read(i)) for i in range(self._hwm())) if b is not None}

    # ------------------------------------------------------------ writing
    def _index(self, now: float) -> tuple[dict[tuple[str, str], int], set[int], set[int]]:
        """(key -> slot of every record, empty slots, expired slots), kept between
        calls and rebuilt only when another process wrote since (call under the lock).
        The supervisor's bursts of writes (cluster sync) then cost O(1) each."""
        gen = self.generation()
        if gen == self._idx_gen:
            return self._idx, self._empty, self._expired
        changed = self.changes(self._idx_gen, gen)
        if changed is None:
            self._idx, self._slot_key, self._empty, self._expired = {}, {}, set(), set()
            changed = set(range(self._hwm()))
        idx, slot_key, empty, expired = self._idx, self._slot_key, self._empty, self._expired
        for i in changed:
            old = slot_key.pop(i, None)
            if old is not None and idx.get(old) == i:
                del idx[old]
            empty.discard(i)
            expired.discard(i)
            b = self._read(i)
            if b is None:
                empty.add(i)
                continue
            idx[(b.kind, b.name)] = slot_key[i] = i
            if not b.active(now):
                expired.add(i)
        self._idx_gen = gen
        return idx, empty, expired

    def add(self, ban: Ban, now: float | None = None) -> bool:
        """Insert or replace the ban on (kind, name). False when the table is full
        of bans that may not be replaced."""
        now = time.time() if now is None else now
        key = (ban.kind, ban.name)
        with self.locked():
            idx, empty, expired = self._index(now)
            hwm = self._hwm()
            slot = idx.get(key)
            if slot is not None:
                expired.discard(slot)  # the same key again: its record is reused in place
            if slot is None and empty:
                slot = empty.pop()
            if slot is None and expired:
                slot = expired.pop()
            if slot is None and hwm < self.capacity:
                slot, hwm = hwm, hwm + 1
            if slot is None:
                slot = self._victim(now)
            if slot is None:
                return False
            old = self._read(slot)
            if old is not None and (old.kind, old.name) != key:
                idx.pop((old.kind, old.name), None)
            self._set_hwm(hwm)
            self._write(slot, ban)
            idx[key] = self._slot_key[slot] = slot
            self._idx_gen = self.generation()
            return True

    def _victim(self, now: float) -> int | None:
        """A full table: the automatic ban that ends soonest (expired ones first)."""
        victim, victim_exp = None, float("inf")
        for i in range(self._hwm()):
            b = self._read(i)
            if b is None or not b.active(now):
                return i
            if not b.manual and b.expires_at is not None and b.expires_at < victim_exp:
                victim, victim_exp = i, b.expires_at
        return victim

    def remove(self, kind: str, name: str) -> bool:
        with self.locked():
            idx, empty, expired = self._index(time.time())
            slot = idx.pop((kind, name), None)
            if slot is None:
                return False
            self._write(slot, None)
            self._slot_key.pop(slot, None)
            expired.discard(slot)
            empty.add(slot)
            self._idx_gen = self.generation()
            return True

    def purge(self, now: float | None = None) -> int:
        """Free expired records (the supervisor calls this now and then)."""
        now = time.time() if now is None else now
        n = 0
        with self.locked():
            for i in range(self._hwm()):
                raw_kind = self.mm[self.base + i * REC_SIZE + 4]
                b = self._read(i)
                if (b is None and raw_kind != 0) or (b is not None and not b.active(now)):
                    self._write(i, None)
                    n += 1
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.words.release()
            self.words32.release()
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _packed(ip: str) -> tuple[int, int] | None:
    """(address width in bits, address as an int), cheaper than ipaddress."""
    try:
        if ":" in ip:
            return 128, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
        if ip.count(".") != 3:
            return None
        return 32, int.from_bytes(socket.inet_aton(ip), "big")
    except OSError:
        return None


class BanView:
    """A reader's parsed copy of the table, brought up to date from the change
    log when the generation moves (the whole table only when the log cannot)."""

    def __init__(self, table: BanTable, classes: dict[str, list[str]]) -> None:
        self.table = table
        self.class_nets = {name: [ipaddress.ip_network(n, strict=False) for n in nets] for name, nets in classes.items()}
        self.gen = -1
        self.by_slot: dict[int, Ban] = {}
        self.hosts: dict[str, Ban] = {}
        self.users: dict[str, Ban] = {}
        self.net_slots: dict[int, list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Ban]]] = {}
        self.nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Ban]] = []
        self._masks: list[tuple[int, int, int, Ban]] = []
        self.full_reads = 0  # whole-table parses (the first, and when the log fell behind)
        self._nets_dirty = False
        # The supervisor's loop and its cluster sync thread share one view: one catches up at a time.
        self._lock = threading.Lock()

    @property
    def bans(self) -> list[Ban]:
        return list(self.by_slot.values())

    def refresh(self) -> bool:
        """Catch up with the table; True when something changed."""
        if self.table.generation() == self.gen:
            return False
        with self._lock:
            return self._catch_up()

    def _catch_up(self) -> bool:
        gen = self.table.generation()
        if gen == self.gen:
            return False
        changed = self.table.changes(self.gen, gen)
        if changed is None:
            gen, records = self.table.records()
            self.by_slot, self.hosts, self.users, self.net_slots = {}, {}, {}, {}
            self.full_reads += 1
        else:
            records = {i: b for i, b in ((i, self.table._read(i)) for i in changed) if b is not None}
            for i in changed:  # out first: a key that moved to another record must not be dropped after its add
                self._drop(i)
        for i, b in records.items():
            self._put(i, b)
        if self._nets_dirty or changed is None:
            self._nets_dirty = False
            self.nets = [nb for i in sorted(self.net_slots) for nb in self.net_slots[i]]
            # Integer masks: a containment test without building ipaddress objects (~0.1 us each).
            self._masks = [(n.max_prefixlen, int(n.network_address), int(n.netmask), b) for n, b in self.nets]
        self.gen = gen
        return True

    def _drop(self, i: int) -> None:
        old = self.by_slot.pop(i, None)
        if old is None:
            return
        if self.net_slots.pop(i, None) is not None:
            self._nets_dirty = True
            return
        index = self.hosts if old.kind == "host" else self.users
        if index.get(old.name) is old:
            del index[old.name]

    def _put(self, i: int, b: Ban) -> None:
        self._drop(i)
        self.by_slot[i] = b
        if b.kind == "host":
            if "/" in b.name:
                with contextlib.suppress(ValueError):
                    self.net_slots[i] = [(ipaddress.ip_network(b.name, strict=False), b)]
                    self._nets_dirty = True
            else:
                self.hosts[b.name] = b
        elif b.kind == "class":
            self.net_slots[i] = [(net, b) for net in self.class_nets.get(b.name, ())]
            self._nets_dirty = True
        else:
            self.users[b.name] = b

    def host_ban(self, ip: str, now: float | None = None) -> Ban | None:
        self.refresh()
        if not self.hosts and not self.nets:
            return None
        now = time.time() if now is None else now
        b = self.hosts.get(ip)
        if b is not None and b.active(now):
            return b
        if self.nets:
            packed = _packed(ip)
            if packed is None:
                return None
            for width, network, mask, b in self._masks:
                if width == packed[0] and packed[1] & mask == network and b.active(now):
                    return b
        return None

    def user_ban(self, user: str, ip: str, now: float | None = None) -> Ban | None:
        self.refresh()
        if not self.users:
            return None
        now = time.time() if now is None else now
        for key in (user, f"{user}@{ip}"):
            b = self.users.get(key)
            if b is not None and b.active(now):
                return b
        return None
