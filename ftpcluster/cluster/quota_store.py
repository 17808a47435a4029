"""Disk usage per user, shared by every host: bytes and files under the home.

The filesystem under the home is the truth (`scan_home`). memcached caches it
as one record per user, `quota:<user>` = {"b": bytes, "f": files}, carrying a
MAC under the cluster key (record_mac.py, kind "quota") and moved by every
host with gets/cas as uploads, deletes and overwrites happen. A missing record
(evicted, a server lost, never scanned) or one without a valid MAC (written by
something without the cluster key) means "scan again". What an attacker on the
memcached network can still do is delete it (a rescan follows) or put back an
older record of the same user, which makes that user's usage look lower until
the next rescan (`[limits] quota_rescan_interval`, or `ftpcluster quota rescan
USER`), which rewrites it from the disk.

Without memcached (disabled, down, or no cluster key) a host keeps the same
two numbers in a small file per user under `state_dir/quota/`, updated under
flock by every node of the host.

Scans skip the temporary files of atomic uploads in flight (their bytes are in
the usage as reservations), so a scan that replaces the usage drops those
reservations. Each stored scan therefore starts a new generation ("g", random):
an upload passes its reservations and the generation they went into with each
move (`Reserved`), and the move adds them again when the generation changed.

Blocking calls: nodes run them on their limits threads, the CLI directly.
The record lives on the first live replica only (like ban counters); a server
that goes away takes it along and the next read rescans."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .memcache_ring import Ring
from .record_mac import load_record_mac
from .session_seal import SealError

TEMP_PREFIX = ".ftpcluster-upload."  # in-flight atomic uploads: counted by their reservations instead
COUNTER_TTL_MIN = 3600
Reserved = tuple[int, int, int]  # (generation, bytes, files) an upload in flight reserved


def new_generation() -> int:
    return secrets.randbits(31) | 1  # 0: a record written before generations


def _rebased(cur_gen: int, d_bytes: int, d_files: int, rebase: Reserved | None) -> tuple[int, int]:
    """The move, plus the caller's earlier reservations when a scan has replaced them."""
    if rebase is not None and rebase[0] != cur_gen:
        return d_bytes + rebase[1], d_files + rebase[2]
    return d_bytes, d_files


@dataclass(frozen=True, slots=True)
class Usage:
    used_bytes: int
    used_files: int
    source: str  # memcache | local | scan


def scan_home(home: str) -> tuple[int, int]:
    """(bytes, files) of the regular files under `home`, symlinks not followed."""
    total = files = 0
    stack = [home]
    while stack:
        folder = stack.pop()
        try:
            it = os.scandir(folder)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False) and not e.name.startswith(TEMP_PREFIX):
                        total += e.stat(follow_symlinks=False).st_size
                        files += 1
                except OSError:
                    continue
    return total, files


def _parse(payload: bytes | None) -> tuple[int, int, int] | None:
    if payload is None or len(payload) > 200:
        return None
    try:
        d = json.loads(payload)
        b, f, g = d["b"], d["f"], d.get("g", 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not (isinstance(b, int) and isinstance(f, int) and isinstance(g, int) and b >= 0 and f >= 0):
        return None
    return b, f, g


class MemcacheUsage:
    """The MACed usage records in memcached. Every method returns None (or False)
    when memcached cannot answer or the record is missing or not ours: the caller
    then falls back or rescans."""

    def __init__(self, ring: Ring, mac: Any, rescan_interval: float, tries: int = 8) -> None:
        self.ring = ring
        self.mac = mac  # record_mac.RecordMac
        self.ttl = int(max(COUNTER_TTL_MIN, 3 * rescan_interval))
        self.tries = tries

    def _first(self, name: str) -> Any:
        t = self.ring.targets(name)
        return t[0] if t else None

    def _seal(self, name: str, b: int, f: int, g: int) -> bytes:
        return self.mac.seal(name, json.dumps({"b": max(0, b), "f": max(0, f), "g": g}, separators=(",", ":")).encode())

    def get(self, user: str) -> tuple[int, int] | None:
        name = f"quota:{user}"
        s = self._first(name)
        if s is None:
            return None
        k = self.ring.key(name)
        ok, raw = self.ring._call(s, "get", lambda c: c.get(k))
        got = _parse(self.mac.open("quota", name, raw, s.address)) if ok else None
        return got[:2] if got is not None else None

    def put(self, user: str, used_bytes: int, used_files: int) -> bool:
        name = f"quota:{user}"
        s = self._first(name)
        if s is None:
            return False
        k, value = self.ring.key(name), self._seal(name, used_bytes, used_files, new_generation())
        ok, _ = self.ring._call(s, "set", lambda c: c.set(k, value, expire=self.ttl, noreply=False))
        return bool(ok)

    def token(self, user: str) -> tuple[bool, Any]:
        """(answered, cas token or None when there is no record): taken before a scan,
        so the scan's result is stored only if nothing moved the usage meanwhile."""
        name = f"quota:{user}"
        s = self._first(name)
        if s is None:
            return False, None
        k = self.ring.key(name)
        ok, got = self.ring._call(s, "get", lambda c: c.gets(k))
        if not ok:
            return False, None
        return True, (got[1] if got and got[0] is not None else None)

    def store_scan(self, user: str, used_bytes: int, used_files: int, token: Any) -> int | None:
        """A scan's result, in a new generation (returned): `add` where there was no
        record, else `cas` on the token read before the scan. None when the usage
        moved meanwhile (scan again)."""
        name = f"quota:{user}"
        s = self._first(name)
        if s is None:
            return None
        gen = new_generation()
        k, value = self.ring.key(name), self._seal(name, used_bytes, used_files, gen)
        if token is None:
            ok, stored = self.ring._call(s, "add", lambda c: c.add(k, value, expire=self.ttl, noreply=False))
        else:
            ok, stored = self.ring._call(s, "cas", lambda c: c.cas(k, value, token, expire=self.ttl, noreply=False))
        return gen if ok and stored else None

    def add(self, user: str, d_bytes: int, d_files: int, rebase: Reserved | None = None) -> tuple[int, int, int] | None:
        """Move the usage (gets/cas); the new (bytes, files, generation), or None
        (memcached down, the record missing or not ours, or too much contention)."""
        name = f"quota:{user}"
        s = self._first(name)
        if s is None:
            return None
        k = self.ring.key(name)
        for _ in range(self.tries):
            ok, got = self.ring._call(s, "get", lambda c: c.gets(k))
            if not ok or not got or got[0] is None:
                return None
            cur = _parse(self.mac.open("quota", name, got[0], s.address))
            if cur is None:
                return None
            db, df = _rebased(cur[2], d_bytes, d_files, rebase)
            if not (db or df):
                return cur  # nothing to write (a refresh, a settled upload)
            new = (max(0, cur[0] + db), max(0, cur[1] + df), cur[2])
            value, token = self._seal(name, *new), got[1]
            ok, stored = self.ring._call(s, "cas", lambda c: c.cas(k, value, token, expire=self.ttl, noreply=False))
            if not ok:
                return None
            if stored:
                return new
        return None

    def claim_rescan(self, user: str, interval: float) -> bool:
        """One host per interval rescans a user: the one whose `add` succeeds."""
        name = f"quota-scan:{user}"
        s = self._first(name)
        if s is None:
            return False
        k = self.ring.key(name)
        ok, stored = self.ring._call(s, "add", lambda c: c.add(k, b"1", expire=max(1, int(interval)), noreply=False))
        return bool(ok and stored)


class LocalUsage:
    """This host's copy, one JSON file per user under `state_dir/quota`, locked with flock."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "quota"

    def _path(self, user: str) -> Path:
        return self.dir / f"{user}.json"

    @contextlib.contextmanager
    def _locked(self, user: str) -> Any:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(user), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _raw(fd: int) -> bytes:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096)

    @staticmethod
    def _read(fd: int) -> tuple[int, int, int] | None:
        try:
            d = json.loads(LocalUsage._raw(fd))
            return int(d["bytes"]), int(d["files"]), int(d.get("g", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @staticmethod
    def _write(fd: int, b: int, f: int, g: int) -> None:
        data = json.dumps({"bytes": max(0, b), "files": max(0, f), "g": g, "time": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def get(self, user: str) -> tuple[int, int] | None:
        try:
            with self._locked(user) as fd:
                got = self._read(fd)
                return got[:2] if got is not None else None
        except OSError:
            return None

    def put(self, user: str, b: int, f: int) -> int | None:
        """A scan's result, unconditionally, in a new generation (returned; None: not written)."""
        with contextlib.suppress(OSError), self._locked(user) as fd:
            gen = new_generation()
            self._write(fd, b, f, gen)
            return gen
        return None

    def token(self, user: str) -> bytes | None:
        """The file as it is before a scan (None: unreadable)."""
        try:
            with self._locked(user) as fd:
                return self._raw(fd)
        except OSError:
            return None

    def store_scan(self, user: str, b: int, f: int, token: bytes) -> int | None:
        """A scan's result in a new generation (returned), only if the file is still
        what `token` read before the scan: no node moved the usage meanwhile."""
        try:
            with self._locked(user) as fd:
                if self._raw(fd) != token:
                    return None
                gen = new_generation()
                self._write(fd, b, f, gen)
                return gen
        except OSError:
            return None

    def add(self, user: str, d_bytes: int, d_files: int, rebase: Reserved | None = None) -> tuple[int, int, int] | None:
        try:
            with self._locked(user) as fd:
                got = self._read(fd)
                if got is None:
                    return None
                db, df = _rebased(got[2], d_bytes, d_files, rebase)
                if not (db or df):
                    return got
                b, f = max(0, got[0] + db), max(0, got[1] + df)
                self._write(fd, b, f, got[2])
                return b, f, got[2]
        except OSError:
            return None


def memcache_usage(cfg: Any, ring: Ring) -> MemcacheUsage | None:
    """None without a usable cluster key: usage then stays out of memcached."""
    try:
        return MemcacheUsage(ring, load_record_mac(cfg, ring.prefix), cfg.limits.quota_rescan_interval)
    except SealError:
        return None


def show_usage(cfg: Any, user: str, home: str) -> Usage:
    """For `ftpcluster quota show`: memcached's record, else this host's file, else a scan."""
    got = None
    if cfg.memcache.enabled:
        ring = Ring(cfg)
        try:
            mcu = memcache_usage(cfg, ring)
            got = mcu.get(user) if mcu is not None else None
        finally:
            ring.close()
        if got is not None:
            return Usage(got[0], got[1], "memcache")
    else:
        got = LocalUsage(cfg.state_dir).get(user)
        if got is not None:
            return Usage(got[0], got[1], "local")
    b, f = scan_home(home)
    return Usage(b, f, "scan")


def rescan_usage(cfg: Any, user: str, home: str) -> tuple[Usage, bool]:
    """For `ftpcluster quota rescan`: scan, then write memcached and this host's file.
    Returns the usage and whether memcached took it (always True without memcached)."""
    b, f = scan_home(home)
    LocalUsage(cfg.state_dir).put(user, b, f)
    stored = True
    if cfg.memcache.enabled:
        ring = Ring(cfg)
        try:
            mcu = memcache_usage(cfg, ring)
            stored = mcu is not None and mcu.put(user, b, f)
        finally:
            ring.close()
    return Usage(b, f, "scan"), stored
