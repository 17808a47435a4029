"""The host's ban table in shared memory: every node reads it on each connection
and at login; nodes (automatic bans) and the supervisor (manual and cluster bans)
write it.

Why this shape:
- Readers never lock. Each record carries a CRC32, so a record torn by a writer
  killed with SIGKILL mid-write is simply not a record (ProFTPD's SysV table with
  flock can be left locked; a POSIX semaphore can be left taken).
- Writers serialize on an fcntl lock, which the kernel drops when the holder
  dies, so a node killed at any instant never wedges the table.
- A generation counter bumped after every change lets each reader keep a
  parsed copy (dicts and a network list) and re-parse only when something
  changed: a lookup for a client that is not banned is a counter read and two
  dict probes, about a microsecond.
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

MAGIC = b"FTPCBAN1"
HEADER = struct.Struct("<8sIIQ")  # magic, capacity, high-water mark, generation
GEN_OFF = 16
GEN = struct.Struct("<Q")
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
        size = HEADER.size + 8 + capacity * REC_SIZE
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        self.mm, self.fd = map_shared(self.path, size, create, wipe=False, mismatch="size differs from [ban] table_size")
        self.base = HEADER.size + 8
        self._idx_gen = -1
        self._idx: dict[tuple[str, str], int] = {}
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
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def generation(self) -> int:
        return GEN.unpack_from(self.mm, GEN_OFF)[0]

    def _hwm(self) -> int:
        return min(HEADER.unpack_from(self.mm, 0)[2], self.capacity)

    def _bump(self, hwm: int | None = None) -> None:
        magic, cap, old_hwm, gen = HEADER.unpack_from(self.mm, 0)
        HEADER.pack_into(self.mm, 0, magic, cap, old_hwm if hwm is None else hwm, gen + 1)

    def _read(self, i: int) -> Ban | None:
        off = self.base + i * REC_SIZE
        raw = self.mm[off : off + RECORD.size]
        crc, kind, origin, manual, expires, created, name, reason, ohost = RECORD.unpack(raw)
        if kind == 0 or crc != zlib.crc32(raw[4:]):
            return None  # free, or torn by a writer that died mid-write
        return Ban(
            KIND_NAMES.get(kind, "host"), name.rstrip(b"\0").decode("utf-8", "replace"), expires or None,
            reason.rstrip(b"\0").decode("utf-8", "replace"), ORIGIN_NAMES.get(origin, "local"), created,
            bool(manual), ohost.rstrip(b"\0").decode("utf-8", "replace"),
        )  # fmt: skip

    def _write(self, i: int, ban: Ban | None) -> None:
        off = self.base + i * REC_SIZE
        if ban is None:
            self.mm[off : off + RECORD.size] = b"\0" * RECORD.size
            return
        body = RECORD.pack(
            0, KINDS[ban.kind], ORIGINS.get(ban.origin, 1), int(ban.manual), ban.expires_at or 0.0, ban.created,
            _enc(ban.name, 80), _enc(ban.reason, 96), _enc(ban.origin_host, 32),
        )[4:]  # fmt: skip
        self.mm[off : off + RECORD.size] = struct.pack("<I", zlib.crc32(body)) + body

    # ------------------------------------------------------------ reading
    def snapshot(self) -> tuple[int, list[Ban]]:
        """(generation, every record) read without a lock; re-read if a writer moved on."""
        for _ in range(8):
            gen = self.generation()
            bans = [b for b in (self._read(i) for i in range(self._hwm())) if b is not None]
            if self.generation() == gen:
                return gen, bans
        return gen, bans  # a busy writer: good enough, the next change re-reads

    # ------------------------------------------------------------ writing
    def _index(self, now: float) -> tuple[dict[tuple[str, str], int], set[int], set[int]]:
        """(key -> slot of every record, empty slots, expired slots), kept between
        calls and rebuilt only when another process wrote since (call under the lock).
        The supervisor's bursts of writes (cluster sync) then cost O(1) each."""
        gen = self.generation()
        if gen != self._idx_gen:
            idx: dict[tuple[str, str], int] = {}
            empty: set[int] = set()
            expired: set[int] = set()
            for i in range(self._hwm()):
                b = self._read(i)
                if b is None:
                    empty.add(i)
                    continue
                idx[(b.kind, b.name)] = i
                if not b.active(now):
                    expired.add(i)
            self._idx, self._empty, self._expired, self._idx_gen = idx, empty, expired, gen
        return self._idx, self._empty, self._expired

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
            self._write(slot, ban)
            idx[key] = slot
            self._bump(hwm)
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
            found = False
            for i in range(self._hwm()):
                b = self._read(i)
                if b is not None and (b.kind, b.name) == (kind, name):
                    self._write(i, None)
                    found = True
            if found:
                self._bump()
            return found

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
            if n:
                self._bump()
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
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
    """A reader's parsed copy of the table, refreshed when the generation moves."""

    def __init__(self, table: BanTable, classes: dict[str, list[str]]) -> None:
        self.table = table
        self.class_nets = {name: [ipaddress.ip_network(n, strict=False) for n in nets] for name, nets in classes.items()}
        self.gen = -1
        self.bans: list[Ban] = []
        self.hosts: dict[str, Ban] = {}
        self.nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Ban]] = []
        self.users: dict[str, Ban] = {}
        self._masks: list[tuple[int, int, int, Ban]] = []

    def refresh(self) -> bool:
        """Re-read after a change; True when something changed."""
        gen = self.table.generation()
        if gen == self.gen:
            return False
        gen, bans = self.table.snapshot()
        hosts: dict[str, Ban] = {}
        nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Ban]] = []
        users: dict[str, Ban] = {}
        for b in bans:
            if b.kind == "host":
                if "/" in b.name:
                    with contextlib.suppress(ValueError):
                        nets.append((ipaddress.ip_network(b.name, strict=False), b))
                else:
                    hosts[b.name] = b
            elif b.kind == "class":
                nets.extend((net, b) for net in self.class_nets.get(b.name, ()))
            else:
                users[b.name] = b
        self.gen, self.bans, self.hosts, self.nets, self.users = gen, bans, hosts, nets, users
        # Integer masks: a containment test without building ipaddress objects (~0.1 us each).
        self._masks = [(n.max_prefixlen, int(n.network_address), int(n.netmask), b) for n, b in nets]
        return True

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
