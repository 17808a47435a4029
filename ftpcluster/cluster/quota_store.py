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

Blocking calls: nodes run them on their limits threads, the CLI directly.
The record lives on the first live replica only (like ban counters); a server
that goes away takes it along and the next read rescans."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .memcache_ring import Ring
from .record_mac import load_record_mac
from .session_seal import SealError

TEMP_PREFIX = ".ftpcluster-upload."  # in-flight atomic uploads: counted by their reservations instead
COUNTER_TTL_MIN = 3600


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


def _parse(payload: bytes | None) -> tuple[int, int] | None:
    if payload is None or len(payload) > 200:
        return None
    try:
        d = json.loads(payload)
        b, f = d["b"], d["f"]
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(b, int) and isinstance(f, int) and b >= 0 and f >= 0):
        return None
    return b, f


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

    def _seal(self, name: str, b: int, f: int) -> bytes:
        return self.mac.seal(name, json.dumps({"b": max(0, b), "f": max(0, f)}, separators=(",", ":")).encode())

    def get(self, user: str) -> tuple[int, int] | None:
        name = f"quota:{user}"
        s = self._first(name)
        if s is None:
            return None
        k = self.ring.key(name)
        ok, raw = self.ring._call(s, "get", lambda c: c.get(k))
        return _parse(self.mac.open("quota", name, raw, s.address)) if ok else None

    def put(self, user: str, used_bytes: int, used_files: int) -> bool:
        name = f"quota:{user}"
        s = self._first(name)
        if s is None:
            return False
        k, value = self.ring.key(name), self._seal(name, used_bytes, used_files)
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

    def store_scan(self, user: str, used_bytes: int, used_files: int, token: Any) -> bool:
        """A scan's result: `add` where there was no record, else `cas` on the token
        read before the scan. False when the usage moved meanwhile (scan again)."""
        name = f"quota:{user}"
        s = self._first(name)
        if s is None:
            return False
        k, value = self.ring.key(name), self._seal(name, used_bytes, used_files)
        if token is None:
            ok, stored = self.ring._call(s, "add", lambda c: c.add(k, value, expire=self.ttl, noreply=False))
        else:
            ok, stored = self.ring._call(s, "cas", lambda c: c.cas(k, value, token, expire=self.ttl, noreply=False))
        return bool(ok and stored)

    def add(self, user: str, d_bytes: int, d_files: int) -> tuple[int, int] | None:
        """Move the usage (gets/cas); the new totals, or None (memcached down, the
        record missing or not ours, or too much contention)."""
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
            new = (max(0, cur[0] + d_bytes), max(0, cur[1] + d_files))
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
    def _read(fd: int) -> tuple[int, int] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            d = json.loads(raw)
            return int(d["bytes"]), int(d["files"])
        except (ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _write(fd: int, b: int, f: int) -> None:
        data = json.dumps({"bytes": max(0, b), "files": max(0, f), "time": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def get(self, user: str) -> tuple[int, int] | None:
        try:
            with self._locked(user) as fd:
                return self._read(fd)
        except OSError:
            return None

    def put(self, user: str, b: int, f: int) -> None:
        with contextlib.suppress(OSError), self._locked(user) as fd:
            self._write(fd, b, f)

    def add(self, user: str, d_bytes: int, d_files: int) -> tuple[int, int] | None:
        try:
            with self._locked(user) as fd:
                got = self._read(fd)
                if got is None:
                    return None
                b, f = max(0, got[0] + d_bytes), max(0, got[1] + d_files)
                self._write(fd, b, f)
                return b, f
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
