"""File management over the control channel: MKD RMD DELE RNFR RNTO SIZE MDTM
MFMT MLST SITE (CHMOD, HELP)."""

from __future__ import annotations

import calendar
import stat
import time
from typing import TYPE_CHECKING

from .commands import Arg, command
from .fs import PathError
from .listing import mlsx_line
from .numbers import is_ascii_number
from .protocol import EventName
from .replies import quote_path

if TYPE_CHECKING:
    from .session import Session


@command("MKD", arg=Arg.REQUIRED, help="MKD <dir>: make a directory", write=True, aliases=("XMKD",))
def mkd(s: Session, arg: str) -> None:
    r = s.resolve(arg)
    s.fs.mkdir(r.real)
    s.reply(257, f"{quote_path(r.virtual)} created")


@command("RMD", arg=Arg.REQUIRED, help="RMD <dir>: remove an empty directory", write=True, aliases=("XRMD",))
def rmd(s: Session, arg: str) -> None:
    r = s.resolve_entry(arg, must_exist=True)  # a symlink to a directory: ENOTDIR, the target stays
    if r.virtual == "/":
        raise PathError("Cannot remove the home directory")
    s.fs.rmdir(r.real)
    s.reply(250, "Directory removed")


@command("DELE", arg=Arg.REQUIRED, help="DELE <file>: delete a file", write=True)
def dele(s: Session, arg: str) -> None:
    r = s.resolve_entry(arg, must_exist=True)  # a symlink: remove the link, never its target
    st = s.fs.lstat(r.real)
    if st is not None and stat.S_ISDIR(st.st_mode):  # a link to a directory is removed itself
        raise PathError("Is a directory: use RMD")
    size = s.fs.remove(r.real)
    s.emit(EventName.DELETE, path=r.virtual, size=size)
    s.reply(250, "File deleted")


@command("RNFR", arg=Arg.REQUIRED, help="RNFR <path>: rename from", write=True)
def rnfr(s: Session, arg: str) -> None:
    r = s.resolve_entry(arg, must_exist=True)  # renames a symlink itself, like mv
    if r.virtual == "/":
        raise PathError("Cannot rename the home directory")
    s.rename_from = r
    s.reply(350, "Ready for RNTO")


@command("RNTO", arg=Arg.REQUIRED, help="RNTO <path>: rename to", write=True)
def rnto(s: Session, arg: str) -> None:
    src, s.rename_from = s.rename_from, None
    if src is None:
        s.reply(503, "RNFR required first")
        return
    dst = s.resolve_entry(arg)  # an existing symlink there is replaced, its target untouched
    if dst.virtual == "/":
        raise PathError("Invalid target")
    if (dst.virtual + "/").startswith(src.virtual.rstrip("/") + "/") and dst.virtual != src.virtual and s.fs.is_dir(src.real):
        s.reply(553, "Not allowed: a directory cannot move into itself")
        return
    replaced = s.fs.rename(src.real, dst.real)  # the size of a regular file it replaced
    fields = {} if replaced is None else {"replaced_size": replaced}
    s.emit(EventName.RENAME, source=src.virtual, target=dst.virtual, **fields)
    s.reply(250, "Rename successful")


@command("SIZE", arg=Arg.REQUIRED, help="SIZE <file>: size in bytes")
def size(s: Session, arg: str) -> None:
    r = s.resolve(arg, must_exist=True)
    st = s.fs.stat(r.real)
    if not stat.S_ISREG(st.st_mode):
        raise PathError("Not a regular file")
    if not s.binary:
        # RFC 3659 section 4: SIZE is what the current TYPE would send. Under TYPE A
        # that means reading the whole file on the control path; refuse like ProFTPD.
        s.reply(550, "SIZE not allowed in ASCII mode; use TYPE I")
        return
    s.reply(213, str(st.st_size))


@command("MDTM", arg=Arg.REQUIRED, help="MDTM <file>: modification time (UTC)")
def mdtm(s: Session, arg: str) -> None:
    r = s.resolve(arg, must_exist=True)
    st = s.fs.stat(r.real)
    if not stat.S_ISREG(st.st_mode):
        raise PathError("Not a regular file")
    s.reply(213, time.strftime("%Y%m%d%H%M%S", time.gmtime(st.st_mtime)))


def parse_mfmt_time(text: str) -> float | None:
    """YYYYMMDDHHMMSS[.sss] in UTC (RFC 3659 time-val)."""
    main, _, frac = text.partition(".")
    if len(main) != 14 or not is_ascii_number(main) or (frac and not is_ascii_number(frac)):
        return None
    try:
        t = time.strptime(main, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return calendar.timegm(t) + (float("0." + frac) if frac else 0.0)


@command("MFMT", arg=Arg.REQUIRED, help="MFMT <time> <file>: set modification time", write=True)
def mfmt(s: Session, arg: str) -> None:
    stamp, _, path = arg.partition(" ")
    when = parse_mfmt_time(stamp)
    if when is None or not path:
        s.reply(501, "Syntax: MFMT YYYYMMDDHHMMSS path")
        return
    r = s.resolve(path, must_exist=True)
    s.fs.utime(r.real, when)
    s.reply(213, f"Modify={stamp}; {r.virtual}")


@command("MLST", arg=Arg.OPTIONAL, help="MLST [path]: facts about one file")
def mlst(s: Session, arg: str) -> None:
    r = s.resolve(arg or ".", must_exist=True)
    st = s.fs.stat(r.real)
    line = mlsx_line(r.virtual, st, s.mlst_facts, writable=not (s.user and s.user.read_only)).decode("utf-8", "surrogateescape")
    # The reply encoder starts a middle line with one space: with the entry's own
    # "facts SP path" that is exactly RFC 3659 section 7.2's " facts path".
    s.reply(250, ["Listing " + r.virtual, line.rstrip("\r\n"), "End"])


SITE_HELP = {"CHMOD": "CHMOD <octal mode> <path>", "QUOTA": "QUOTA: your disk usage and limits", "HELP": "HELP [topic]"}


@command("SITE", arg=Arg.REQUIRED, help="SITE CHMOD <mode> <path> | SITE QUOTA | SITE HELP")
def site(s: Session, arg: str) -> None:
    sub, _, rest = arg.partition(" ")
    sub = sub.upper()
    if sub == "HELP":
        topic = rest.strip().upper()
        if topic and topic not in SITE_HELP:
            s.reply(501, f"SITE HELP: unknown topic {topic}")
        elif topic:
            s.reply(214, SITE_HELP[topic])
        else:
            s.reply(214, ["Site commands:", *SITE_HELP.values(), "End"])
    elif sub == "QUOTA":
        limits = s.settings.limits
        s.reply(200, limits.site_quota(s) if limits is not None else ["No quota.", "End"])
    elif sub == "CHMOD":
        if s.user is not None and s.user.read_only:
            s.reply(550, "Permission denied: read-only account")
            return
        mode_s, _, path = rest.lstrip(" ").partition(" ")  # a path may end in spaces
        mode = int(mode_s, 8) if mode_s and all(c in "01234567" for c in mode_s) and len(mode_s) <= 4 else -1
        if not path or not 0 <= mode <= 0o777:
            s.reply(501, "Syntax: SITE CHMOD <octal mode 0-777> <path>")
            return
        r = s.resolve(path, must_exist=True)
        s.fs.chmod(r.real, mode)
        s.reply(200, "SITE CHMOD command successful")
    else:
        s.reply(500, f"SITE {sub} not understood")
