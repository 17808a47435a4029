"""The filesystem port: everything the session core does to a user's files.

The core calls an `FS` and never `os` itself, so a session can run over any
tree (a test's temporary home, another backend). `LocalFS` is the real disk,
confined to the home by `fs.Home`. Calls that take one system call (stat,
mkdir, rename, ...) run inline; the ones that can take long (a listing: scandir
plus a stat per entry and a sort; STOU's search for a free name) are handed to
the I/O layer as a `RunBlocking` action, which runs them on `fs_pool()`, off the
event loop, and reports back with `Session.blocking_done`."""

from __future__ import annotations

import asyncio
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from .fs import Home, Resolved
from .listing import list_lines, mlsd_lines, nlst_lines

UNIQUE_TRIES = 1000  # STOU: name, name.1 ... name.999, then 553
FS_THREADS = 4


class FS(Protocol):
    """A user's files as the core sees them: virtual paths resolved to confined real ones."""

    root: str

    def resolve(self, cwd: str, arg: str, must_exist: bool = False) -> Resolved: ...
    def resolve_entry(self, cwd: str, arg: str, must_exist: bool = False) -> Resolved: ...
    def to_virtual(self, real: str) -> str: ...
    def real_of(self, virtual: str) -> str: ...
    def stat(self, real: str) -> os.stat_result: ...
    def lstat(self, real: str) -> os.stat_result | None: ...
    def is_dir(self, real: str) -> bool: ...
    def can(self, real: str, mode: int) -> bool: ...
    def mkdir(self, real: str) -> None: ...
    def rmdir(self, real: str) -> None: ...
    def remove(self, real: str) -> int: ...
    def rename(self, src: str, dst: str) -> int | None: ...
    def chmod(self, real: str, mode: int) -> None: ...
    def utime(self, real: str, when: float) -> None: ...
    # blocking: run off the loop (RunBlocking)
    def listing(self, kind: str, real: str, name: str, facts: list[str], writable: bool) -> list[bytes]: ...
    def unique_name(self, real: str) -> str | None: ...


class LocalFS(Home):
    """The local disk under a user's home."""

    def stat(self, real: str) -> os.stat_result:
        return os.stat(real)

    def lstat(self, real: str) -> os.stat_result | None:
        """The entry's own facts, None when it cannot be seen (like os.path.lexists)."""
        try:
            return os.lstat(real)
        except OSError:
            return None

    def is_dir(self, real: str) -> bool:
        return os.path.isdir(real)

    def can(self, real: str, mode: int) -> bool:
        return os.access(real, mode)

    def mkdir(self, real: str) -> None:
        os.mkdir(real, 0o755)

    def rmdir(self, real: str) -> None:
        os.rmdir(real)

    def remove(self, real: str) -> int:
        """Unlink a file (or a link itself); returns the size it had."""
        size = os.lstat(real).st_size
        os.unlink(real)
        return size

    def rename(self, src: str, dst: str) -> int | None:
        """rename(2); returns the size of a regular file it replaced, if any."""
        replaced = self.lstat(dst) if dst != src else None
        os.rename(src, dst)
        return replaced.st_size if replaced is not None and stat.S_ISREG(replaced.st_mode) else None

    def chmod(self, real: str, mode: int) -> None:
        os.chmod(real, mode)

    def utime(self, real: str, when: float) -> None:
        os.utime(real, (when, when))

    def listing(self, kind: str, real: str, name: str, facts: list[str], writable: bool) -> list[bytes]:
        """LIST, NLST or MLSD of `real` as encoded chunks, built whole (it is sorted anyway)."""
        if kind == "MLSD":
            return list(mlsd_lines(real, facts, writable, root=self.root))
        if kind == "NLST":
            return list(nlst_lines(real, name))
        return list(list_lines(real, name, root=self.root))

    def unique_name(self, real: str) -> str | None:
        """`real`, or the first free `real.N`: STOU's name (the upload then creates it
        with O_EXCL, so a race with another client is a failed transfer, not an overwrite)."""
        name = real
        for i in range(1, UNIQUE_TRIES):
            if not os.path.lexists(name):
                return name
            name = f"{real}.{i}"
        return None


_pool: ThreadPoolExecutor | None = None


def fs_pool() -> ThreadPoolExecutor:
    """Threads for blocking port calls, made in the node process on first use (after
    the fork), apart from the password-check and sendfile pools."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=FS_THREADS, thread_name_prefix="fs")
    return _pool


async def run_off_loop(call: Callable[[], Any]) -> Any:
    """Run a blocking port call off the event loop; its exception is returned, not
    raised, so the session answers it like a failed command."""
    try:
        return await asyncio.get_running_loop().run_in_executor(fs_pool(), call)
    except Exception as e:  # noqa: BLE001 - handed to the session as the call's outcome
        return e
