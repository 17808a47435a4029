"""Path confinement: every client path maps to a real path inside the user's home.

Clients see a virtual tree rooted at "/". A path is normalised on the virtual
side first (so ``a/../b`` works), anything that would climb above "/" is
refused, then the real path is resolved with symlinks followed and must still
be inside the home's real path: a symlink pointing outside is refused too.
Refusals are `PathError`, which the session answers with 550."""

from __future__ import annotations

import os
import posixpath
import re
import secrets
import stat
import time
from dataclasses import dataclass, field

_CONTROL_CHAR = re.compile("[\x00-\x1f]")

# Names we create for atomic uploads; hidden from listings and not addressable.
TEMP_PREFIX = ".ftpcluster-upload."


def temp_upload_name() -> str:
    """A hidden temporary name for an atomic upload that says which process owns it
    (`.ftpcluster-upload.<pid>.<random>`), so a crashed node's leftovers can be told
    from a live sibling's uploads in flight (upload_journal.py)."""
    return f"{TEMP_PREFIX}{os.getpid()}.{secrets.token_hex(8)}"


class PathError(Exception):
    """The path is refused; the message is safe to show to the client."""


@dataclass(frozen=True)
class Resolved:
    virtual: str  # normalised, absolute, as the client should see it
    real: str  # absolute real path inside the home
    # The target's os.stat() when resolving walked to it through no symlink (its lstat
    # is then its stat): a handler that needs it makes no second call. None otherwise.
    st: os.stat_result | None = field(default=None, compare=False)


_HOMES: dict[str, tuple[float, str]] = {}
HOME_CACHE_TTL = 5.0


def _real_home(root: str) -> str:
    """realpath of a home, cached a few seconds: it walks every path component with
    lstat, a visible share of a login's cost; a moved home is noticed within the TTL."""
    now = time.monotonic()
    hit = _HOMES.get(root)
    if hit is not None and hit[0] > now:
        return hit[1]
    real = os.path.realpath(root)
    if len(_HOMES) > 4096:
        _HOMES.clear()
    _HOMES[root] = (now + HOME_CACHE_TTL, real)
    return real


class Home:
    """A user's home: the only part of the disk a session can touch."""

    def __init__(self, root: str) -> None:
        self.root = _real_home(root)

    def normalize(self, cwd: str, arg: str) -> str:
        """Virtual absolute path for `arg` relative to `cwd`; refuses escapes and odd bytes."""
        if "\x00" in arg:
            raise PathError("NUL bytes are not allowed in path names")
        if "\\" in arg:
            raise PathError("backslashes are not allowed in path names")
        if _CONTROL_CHAR.search(arg) is not None:
            raise PathError("control characters are not allowed in path names")
        joined = arg if arg.startswith("/") else posixpath.join(cwd, arg)
        parts: list[str] = []
        for part in joined.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise PathError("path leads outside the home directory")
                parts.pop()
                continue
            if part.startswith(TEMP_PREFIX):
                raise PathError("no such file or directory")
            parts.append(part)
        return "/" + "/".join(parts)

    def real_of(self, virtual: str) -> str:
        return os.path.join(self.root, virtual.lstrip("/")) if virtual != "/" else self.root

    def inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def resolve(self, cwd: str, arg: str, must_exist: bool = False) -> Resolved:
        """Confine `arg`. When the target does not exist (STOR, MKD), its parent must
        resolve inside the home, and the final component must not be a dangling link."""
        virtual = self.normalize(cwd, arg)
        real, exists, st = self._realpath(virtual)
        if not self.inside(real):
            raise PathError("path leads outside the home directory")
        if must_exist and not exists:
            raise PathError("no such file or directory")
        return Resolved(virtual, real, st)

    def _realpath(self, virtual: str) -> tuple[str, bool, os.stat_result | None]:
        """os.path.realpath of the home-relative path, and whether it exists, walking
        only the components below the (already real) home: one lstat per component of
        the client's path instead of one per component of the whole absolute path. A
        symlink anywhere hands over to os.path.realpath."""
        real = self.root
        st = None
        for part in virtual.split("/"):
            if not part:
                continue
            real = os.path.join(real, part)
            try:
                st = os.lstat(real)
            except (FileNotFoundError, NotADirectoryError):
                # Missing: realpath keeps the rest as written (nothing below exists)
                return self.real_of(virtual), False, None
            except OSError:
                break
            if stat.S_ISLNK(st.st_mode):
                break
        else:
            return real, True, st
        real = os.path.realpath(self.real_of(virtual))
        return real, os.path.lexists(real), None

    def resolve_entry(self, cwd: str, arg: str, must_exist: bool = False) -> Resolved:
        """Confine `arg` as a directory entry, without following a final symlink: what
        DELE, RMD and RNFR/RNTO act on (the link itself, like rm and mv, wherever it
        points). The parent must resolve inside the home; `real` is the link's own path."""
        virtual = self.normalize(cwd, arg)
        if virtual == "/":
            return self.resolve(cwd, arg, must_exist)
        parent, name = posixpath.split(virtual)
        real_parent = os.path.realpath(self.real_of(parent))
        if not self.inside(real_parent):
            raise PathError("path leads outside the home directory")
        real = os.path.join(real_parent, name)
        if must_exist and not os.path.lexists(real):
            raise PathError("no such file or directory")
        return Resolved(virtual, real)

    def to_virtual(self, real: str) -> str:
        if real == self.root:
            return "/"
        return "/" + os.path.relpath(real, self.root)
