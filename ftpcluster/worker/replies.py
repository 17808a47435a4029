"""How outcomes become reply codes: OS errors, path quoting, passive addresses.
Kept apart from the handlers so the I/O layer (a failed transfer) answers the
same way the core does."""

from __future__ import annotations

import errno

_OS_ERRORS = {
    errno.ENOSPC: (452, "Insufficient storage space"),
    errno.EDQUOT: (452, "Insufficient storage space"),
    errno.ENOENT: (550, "No such file or directory"),
    errno.EACCES: (550, "Permission denied"),
    errno.EPERM: (550, "Permission denied"),
    errno.EROFS: (550, "Permission denied"),
    errno.EEXIST: (550, "File exists"),
    errno.ENOTEMPTY: (550, "Directory not empty"),
    errno.ENOTDIR: (550, "Not a directory"),
    errno.EISDIR: (550, "Is a directory"),
    errno.ENAMETOOLONG: (550, "File name too long"),
    errno.EINVAL: (550, "Invalid argument"),
    errno.EXDEV: (553, "Not allowed: source and target are on different filesystems"),
    errno.ELOOP: (550, "Too many levels of symbolic links"),
}


def os_error_reply(e: OSError) -> tuple[int, str]:
    """The reply for a failed filesystem call; 451 for anything unexpected."""
    return _OS_ERRORS.get(e.errno or 0, (451, "Local error in processing"))


def quote_path(path: str) -> str:
    """RFC 959 257 quoting: double any embedded quote."""
    return '"' + path.replace('"', '""') + '"'


def passive_reply(host: str, port: int, extended: bool) -> tuple[int, str]:
    """227 (PASV, RFC 959) or 229 (EPSV, RFC 2428) for a listener on host:port."""
    if extended:
        return 229, f"Entering Extended Passive Mode (|||{port}|)"
    h = host.replace(".", ",")
    return 227, f"Entering Passive Mode ({h},{port >> 8},{port & 0xFF})."
