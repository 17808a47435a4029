"""Virtual users: the users file (TOML), password hashes and a verification cache.

Hashes are argon2id (argon2-cffi); bcrypt hashes are accepted for migration.
A hash costs tens of milliseconds by design, which would cap logins per second,
so successful verifications are remembered for a while under a keyed hash of
(user, password, stored hash): never the password itself, bounded, with a TTL.
Changing a password changes the stored hash and so misses the cache."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import secrets
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import argon2
import bcrypt

_hasher = argon2.PasswordHasher()  # argon2id, library defaults (RFC 9106 low-memory profile)
NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


class UserError(ValueError):
    """A users-file problem to show the operator."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str
    password: str  # the hash
    home: str
    read_only: bool = False
    user_class: str = ""  # `class` in the file: a table of [limits] classes
    limits: tuple[tuple[str, Any], ...] = ()  # own limits: download_rate, upload_rate, max_upload_size, quota_*


LIMIT_FIELDS = ("download_rate", "upload_rate", "max_upload_size", "quota_bytes", "quota_files")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_hash(stored: str, password: str) -> bool:
    """Constant-time check against an argon2id or bcrypt hash. Slow on purpose."""
    try:
        if stored.startswith("$argon2"):
            return _hasher.verify(stored, password)
        if stored.startswith(("$2a$", "$2b$", "$2y$")):
            return bcrypt.checkpw(password.encode("utf-8", "surrogateescape"), stored.encode())
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError):
        return False
    return False


def validate_name(name: str) -> None:
    if not name or len(name) > 64 or not set(name) <= NAME_OK or name.startswith("-"):
        raise UserError(f"bad user name {name!r}: use letters, digits, . _ - @ (at most 64)")


def load_users(path: Path) -> dict[str, UserRecord]:
    """Read the users file; a missing file means no users."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: {e}") from None
    users: dict[str, UserRecord] = {}
    base = path.resolve().parent
    for i, u in enumerate(data.get("users", [])):
        try:
            name, pw, home = u["name"], u["password"], u["home"]
        except (KeyError, TypeError):
            raise UserError(f"{path}: users[{i}] needs name, password and home") from None
        if not pw.startswith(("$argon2", "$2a$", "$2b$", "$2y$")):
            raise UserError(f"{path}: user {name!r}: password must be an argon2id or bcrypt hash, never plain text")
        own = tuple((k, u[k]) for k in LIMIT_FIELDS if k in u)
        users[name] = UserRecord(name, pw, str((base / home).resolve()), bool(u.get("read_only", False)),
                                 str(u.get("class", "")), own)  # fmt: skip
    return users


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def save_users(path: Path, users: dict[str, UserRecord]) -> None:
    """Atomic rewrite: a temp file beside the old one takes its owner, group and
    mode (so a documented `chgrp ftpcluster; chmod 0640` survives), then a rename.
    A new file is owner-only: it holds hashes."""
    lines = ["# ftpcluster virtual users (managed by `ftpcluster user add/del/passwd`)", ""]
    for u in users.values():
        lines += [
            "[[users]]",
            f"name = {_toml_str(u.name)}",
            f"password = {_toml_str(u.password)}",
            f"home = {_toml_str(u.home)}",
            f"read_only = {'true' if u.read_only else 'false'}",
        ]
        if u.user_class:
            lines.append(f"class = {_toml_str(u.user_class)}")
        lines += [f"{k} = {v if isinstance(v, int) else _toml_str(str(v))}" for k, v in u.limits]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines))
            f.flush()
            os.fsync(f.fileno())
        if st is None:
            os.chmod(tmp, 0o600)
        else:
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_home(home: Path, owner: str = "") -> None:
    """Create a user's home; owned by the service account when one is configured
    and we are root (so the user's uploads do not fail with 550)."""
    home.mkdir(parents=True, exist_ok=True)
    if owner and os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam(owner)
        except KeyError:
            raise UserError(f"[server] user: no such account {owner!r}") from None
        st = home.stat()
        if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid):
            os.chown(home, pw.pw_uid, pw.pw_gid)


def add_user(path: Path, name: str, password: str, home: str, read_only: bool = False, owner: str = "") -> bool:
    """Add or update a user; True when it was new."""
    validate_name(name)
    users = load_users(path)
    old = users.get(name)
    rec = UserRecord(name, hash_password(password), str(Path(home).resolve()), read_only,
                     old.user_class if old else "", old.limits if old else ())  # fmt: skip
    make_home(Path(rec.home), owner)
    new = name not in users
    users[name] = rec
    save_users(path, users)
    return new


def set_password(path: Path, name: str, password: str) -> None:
    users = load_users(path)
    if name not in users:
        raise UserError(f"no such user: {name} (add it with: ftpcluster user add {name} --home DIR --password-stdin)")
    users[name] = dataclasses.replace(users[name], password=hash_password(password))
    save_users(path, users)


def set_quota(path: Path, name: str, quota_bytes: str | None, quota_files: int | None) -> UserRecord:
    """Write a user's own quota into the users file (running servers re-read it)."""
    users = load_users(path)
    if name not in users:
        raise UserError(f"no such user: {name}")
    own = dict(users[name].limits)
    if quota_bytes is not None:
        own["quota_bytes"] = quota_bytes
    if quota_files is not None:
        own["quota_files"] = quota_files
    users[name] = dataclasses.replace(users[name], limits=tuple((k, own[k]) for k in LIMIT_FIELDS if k in own))
    save_users(path, users)
    return users[name]


def del_user(path: Path, name: str) -> None:
    users = load_users(path)
    if name not in users:
        raise UserError(f"no such user: {name}")
    del users[name]
    save_users(path, users)


def random_password() -> str:
    return secrets.token_urlsafe(12)


class Authenticator:
    """Verifies logins against the users file with a bounded success cache.

    Thread-safe: `verify` runs in a worker's thread pool, off the event loop."""

    def __init__(self, users: dict[str, UserRecord], cache_size: int = 4096, cache_ttl: float = 300.0) -> None:
        self.users = users
        self._key = secrets.token_bytes(32)  # per process: cache entries mean nothing elsewhere
        self._cache: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._size = cache_size
        self._ttl = cache_ttl
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _cache_key(self, rec: UserRecord, password: str) -> bytes:
        # Keyed BLAKE2b is a MAC in one C call (HMAC-SHA256 is eight Python calls): a
        # login's cache lookup runs on the event loop.
        msg = f"{rec.name}\0{rec.password}\0{password}".encode("utf-8", "surrogateescape")
        return hashlib.blake2b(msg, key=self._key, digest_size=32).digest()

    def cached(self, name: str, password: str) -> UserRecord | None:
        """The user when this password was verified recently: cheap enough for the
        event loop (one HMAC), so a repeat login needs no thread hop."""
        rec = self.users.get(name)
        if rec is None or not password:
            return None
        key = self._cache_key(rec, password)
        with self._lock:
            exp = self._cache.get(key)
            if exp is not None and exp > time.monotonic():
                self._cache.move_to_end(key)
                self.hits += 1
                return rec
        return None

    def flight_key(self, name: str, password: str) -> bytes:
        """Names one verification in progress (concurrent identical logins share it)."""
        msg = f"{name}\0{password}".encode("utf-8", "surrogateescape")
        return hashlib.blake2b(msg, key=self._key, digest_size=32).digest()

    def verify(self, name: str, password: str) -> UserRecord | None:
        rec = self.users.get(name)
        if rec is None or not password:
            # Spend similar time on unknown users so names cannot be probed by timing.
            check_hash(_DUMMY_HASH, password or "x")
            return None
        key = self._cache_key(rec, password)
        now = time.monotonic()
        with self._lock:
            exp = self._cache.get(key)
            if exp is not None and exp > now:
                self._cache.move_to_end(key)
                self.hits += 1
                return rec
        self.misses += 1
        if not check_hash(rec.password, password):
            return None
        with self._lock:
            self._cache[key] = now + self._ttl
            self._cache.move_to_end(key)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return rec

    def forget(self, name: str) -> None:
        """Drop everything cached (used when a user is banned or the file reloads)."""
        with self._lock:
            self._cache.clear()


_DUMMY_HASH = _hasher.hash(secrets.token_hex(8))
