"""Transfer log in the classic wu-ftpd / ProFTPD xferlog format, one line per
completed or aborted transfer, so existing log tools parse it:

    Mon Nov 24 22:46:35 2026 1 127.0.0.1 3000000 /srv/a.bin b _ i r alice ftp 0 * c

time, transfer seconds, remote host, bytes, file name (whitespace -> "_", as
ProFTPD does), type a|b, special action "_", direction o|i|d, access mode
a|r, user, service "ftp", auth method 0, auth user id "*", status c|i.

Every node appends to the same file: one os.write per line on an O_APPEND
descriptor keeps lines whole."""

from __future__ import annotations

import os
import re
import time

from .protocol import Event, EventName, SessionInfo

_WS = re.compile(r"\s")


def format_line(
    when: float,
    seconds: float,
    host: str,
    nbytes: int,
    filename: str,
    ascii: bool,
    direction: str,
    anonymous: bool,
    user: str,
    complete: bool,
) -> str:
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(when))
    name = _WS.sub("_", filename) or "-"
    return (
        f"{stamp} {max(0, round(seconds))} {host} {nbytes} {name} {'a' if ascii else 'b'} _ {direction} "
        f"{'a' if anonymous else 'r'} {_WS.sub('_', user) or '-'} ftp 0 * {'c' if complete else 'i'}\n"
    )


class XferLog:
    events = frozenset({EventName.TRANSFER, EventName.DELETE})  # what it hears (protocol.hears)
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        old, self.fd = self.fd, fd
        if old >= 0:
            os.close(old)

    def write(self, line: str) -> None:
        try:
            os.write(self.fd, line.encode("utf-8", "surrogateescape"))
        except OSError:
            pass  # a full disk must not break transfers

    def __call__(self, event: Event, info: SessionInfo | None) -> None:
        """Event subscriber: transfers and deletions."""
        if info is None or event.name not in (EventName.TRANSFER, EventName.DELETE):
            return
        f = event.fields
        real = info.real_path(f.get("path", ""))
        user, anonymous = info.user or "", bool(info.user and info.anonymous)
        if event.name == EventName.DELETE:
            line = format_line(time.time(), 0, info.client_ip, 0, real, False, "d", anonymous, user, True)
        else:
            line = format_line(
                time.time(),
                f.get("seconds", 0.0),
                info.client_ip,
                int(f.get("bytes", 0)),
                real,
                bool(f.get("ascii")),
                f.get("direction", "o"),
                anonymous,
                user,
                f.get("status") == "ok",
            )
        self.write(line)
