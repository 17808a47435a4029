"""Directory listings: LIST (ls -l style), NLST (names), MLSD/MLST (RFC 3659 facts).

Listings are generators of encoded chunks so a large directory streams over
the data connection instead of being built whole in memory."""

from __future__ import annotations

import os
import stat
import time
from typing import Iterator

from .fs import TEMP_PREFIX

MLST_FACTS = ("type", "size", "modify", "perm", "unix.mode")  # RFC 3659 facts we offer
_SIX_MONTHS = 180 * 86400
_SPECIAL = {stat.S_IFIFO: "OS.unix=fifo", stat.S_IFSOCK: "OS.unix=socket", stat.S_IFCHR: "OS.unix=chr", stat.S_IFBLK: "OS.unix=blk"}
CHUNK = 64 * 1024


def _entries(real_dir: str, root: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(name, stat) of each entry. A symlink whose target is inside `root` (the home)
    shows its target's facts; one that leaves the home (or dangles) shows its own lstat,
    so a listing never reveals the size, mode or type of anything outside the home."""
    with os.scandir(real_dir) as it:
        for entry in it:
            if entry.name.startswith(TEMP_PREFIX) or "\n" in entry.name or "\r" in entry.name:
                continue  # a name with CR or LF (made outside FTP) would read as two entries
            try:
                follow = not entry.is_symlink() or _inside(root, os.path.realpath(entry.path))
                yield entry.name, entry.stat(follow_symlinks=follow)
            except OSError:
                try:
                    yield entry.name, entry.stat(follow_symlinks=False)
                except OSError:
                    continue


def _inside(root: str, real: str) -> bool:
    return bool(root) and (real == root or real.startswith(root.rstrip("/") + "/"))


def _chunks(lines: Iterator[bytes]) -> Iterator[bytes]:
    buf: list[bytes] = []
    size = 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= CHUNK:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


def _enc(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def ls_line(name: str, st: os.stat_result, now: float | None = None) -> bytes:
    now = time.time() if now is None else now
    mode = stat.filemode(st.st_mode)
    t = time.localtime(st.st_mtime)
    when = time.strftime("%b %d %H:%M", t) if abs(now - st.st_mtime) < _SIX_MONTHS else time.strftime("%b %d  %Y", t)
    return b"%s %3d %-8s %-8s %8d %s %s\r\n" % (
        mode.encode(),
        st.st_nlink,
        b"ftp",
        b"ftp",
        st.st_size,
        when.encode(),
        _enc(name),
    )


def list_lines(real: str, name_if_file: str, root: str = "") -> Iterator[bytes]:
    """LIST of a directory, or of one file when `real` is a file. `root`: the home
    (symlinks leading outside it are listed as links; without it, every link is)."""
    now = time.time()
    if not os.path.isdir(real):
        yield ls_line(name_if_file, os.stat(real), now)
        return
    yield from _chunks(ls_line(n, st, now) for n, st in sorted(_entries(real, root)))


def nlst_lines(real: str, name_if_file: str) -> Iterator[bytes]:
    if not os.path.isdir(real):
        yield _enc(name_if_file) + b"\r\n"
        return
    yield from _chunks(_enc(n) + b"\r\n" for n, _ in sorted(_entries(real)))


def mlsx_line(name: str, st: os.stat_result, facts: list[str], writable: bool, kind: str | None = None) -> bytes:
    is_dir = stat.S_ISDIR(st.st_mode)
    if kind is None and stat.S_ISLNK(st.st_mode):
        kind = "OS.unix=symlink"  # a link leaving the home: only DELE/RNFR apply to it
    elif kind is None and not is_dir and not stat.S_ISREG(st.st_mode):
        kind = _SPECIAL.get(stat.S_IFMT(st.st_mode), "OS.unix=special")  # RFC 3659 7.5.1: OS.name=type
    parts = []
    if "type" in facts:
        parts.append(f"type={kind or ('dir' if is_dir else 'file')}")
    if "size" in facts:
        parts.append(f"size={st.st_size}")
    if "modify" in facts:
        parts.append("modify=" + time.strftime("%Y%m%d%H%M%S", time.gmtime(st.st_mtime)))
    if "perm" in facts:
        if kind is not None and kind.startswith("OS.unix="):
            perm = "df" if writable else ""  # a link leaving the home, a FIFO, a device: no transfer
        elif is_dir:
            perm = "elcmfp" if writable else "el"
        else:
            perm = "radfw" if writable else "r"
        parts.append(f"perm={perm}")
    if "unix.mode" in facts:
        parts.append(f"unix.mode=0{stat.S_IMODE(st.st_mode):o}")
    # RFC 3659 section 7.2: entry = [facts] SP pathname, where every fact ends in ";".
    return _enc("".join(p + ";" for p in parts) + " " + name) + b"\r\n"


def mlsd_lines(real: str, facts: list[str], writable: bool, root: str = "") -> Iterator[bytes]:
    yield mlsx_line(".", os.stat(real), facts, writable, kind="cdir")
    yield from _chunks(mlsx_line(n, st, facts, writable) for n, st in sorted(_entries(real, root)))
