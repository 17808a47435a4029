"""Disk usage per user, shared by every host: bytes and files under the home.

The filesystem under the home is the truth (`scan_home`). memcached caches it
as two counters per user, `quota:<user>:b` and `quota:<user>:f`, which every
host moves with incr/decr as uploads, deletes and overwrites happen; a missing
counter (evicted, a server lost, never scanned) means "scan again". Without
memcached (disabled or down) a host keeps the same two numbers in a small file
per user under `state_dir/quota/`, updated under flock by every node of the
host. memcached is untrusted: a forged counter can only make a user's usage
look wrong until the next rescan (`[limits] quota_rescan_interval`, or
`ftpcluster quota rescan USER`), which rewrites it from the disk.

Blocking calls: nodes run them on their limits threads, the CLI directly.
Counters live on the first live replica only (like ban counters); a server that
goes away takes them along and the next read rescans."""

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


def _parse_int(raw: Any) -> int | None:
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > 20:
        return None
    try:
        v = int(raw.strip())
    except ValueError:
        return None
    return v if v >= 0 else None


class MemcacheUsage:
    """The counters in memcached. Every method returns None when memcached cannot
    answer (or a counter is missing): the caller then falls back or rescans."""

    def __init__(self, ring: Ring, rescan_interval: float) -> None:
        self.ring = ring
        self.ttl = int(max(COUNTER_TTL_MIN, 3 * rescan_interval))

    def _first(self, name: str) -> Any:
        t = self.ring.targets(name)
        return t[0] if t else None

    def get(self, user: str) -> tuple[int, int] | None:
        out = []
        for suffix in ("b", "f"):
            name = f"quota:{user}:{suffix}"
            s = self._first(name)
            if s is None:
                return None
            k = self.ring.key(name)
            ok, raw = self.ring._call(s, "get", lambda c: c.get(k))
            v = _parse_int(raw) if ok else None
            if v is None:
                return None
            out.append(v)
        return out[0], out[1]

    def put(self, user: str, used_bytes: int, used_files: int) -> bool:
        ok_all = True
        for suffix, v in (("b", used_bytes), ("f", used_files)):
            name = f"quota:{user}:{suffix}"
            s = self._first(name)
            if s is None:
                return False
            k = self.ring.key(name)
            ok, _ = self.ring._call(s, "set", lambda c: c.set(k, str(max(0, v)).encode(), expire=self.ttl, noreply=False))
            ok_all = ok_all and ok
        return ok_all

    def add(self, user: str, d_bytes: int, d_files: int) -> tuple[int, int] | None:
        """Move the counters; the new totals, or None (memcached down or a counter missing)."""
        out = []
        for suffix, d in (("b", d_bytes), ("f", d_files)):
            name = f"quota:{user}:{suffix}"
            s = self._first(name)
            if s is None:
                return None
            k = self.ring.key(name)
            if d >= 0:
                ok, v = self.ring._call(s, "incr", lambda c: c.incr(k, d, noreply=False))
            else:
                ok, v = self.ring._call(s, "incr", lambda c: c.decr(k, -d, noreply=False))
            if not ok or v is None:
                return None
            out.append(int(v))
        return out[0], out[1]

    def claim_rescan(self, user: str, interval: float) -> bool:
        """One host per interval rescans a user: the one whose `add` succeeds."""
        name = f"quota:{user}:scan"
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


def show_usage(cfg: Any, user: str, home: str) -> Usage:
    """For `ftpcluster quota show`: memcached's counters, else this host's file, else a scan."""
    if cfg.memcache.enabled:
        ring = Ring(cfg)
        try:
            got = MemcacheUsage(ring, cfg.limits.quota_rescan_interval).get(user)
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
            stored = MemcacheUsage(ring, cfg.limits.quota_rescan_interval).put(user, b, f)
        finally:
            ring.close()
    return Usage(b, f, "scan"), stored
