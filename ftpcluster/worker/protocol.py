"""What crosses the boundary of the sans-IO core: replies, actions and events.

The core (`session.Session`) never touches a socket. It returns a list of these
objects; the asyncio layer writes replies, performs actions and reports their
outcome back through the session's ``*_done`` / ``*_ready`` methods. Events are
what the ban engine, metrics and logs subscribe to (ProFTPD's event model)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

# The event names are defined in the bottom layer (config.py validates ban rules against
# them, cluster/ counts them) and re-exported here for the session side.
from ..events import BAN_EVENTS, EventName  # noqa: F401


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str | tuple[str, ...]

    def encode(self) -> bytes:
        """Single or multi-line reply, RFC 959 section 4.2; CR/LF in text cannot split it."""
        text = self.text
        if isinstance(text, str):
            if "\r" in text or "\n" in text:
                text = _clean(text)
            return f"{self.code} {text}\r\n".encode("utf-8", "surrogateescape")
        lines = list(self.text)
        if len(lines) == 1:
            return Reply(self.code, lines[0]).encode()
        out = [f"{self.code}-{_clean(lines[0])}"]
        # Middle lines start with a space so a line can never look like "NNN ".
        out += [" " + _clean(line) for line in lines[1:-1]]
        out.append(f"{self.code} {_clean(lines[-1])}")
        return ("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape")


def _clean(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


# ------------------------------------------------------------------ actions
@dataclass(frozen=True, slots=True)
class StartTLS:
    """Upgrade the control connection now (after the 234 reply is flushed)."""


@dataclass(frozen=True, slots=True)
class VerifyPassword:
    """Check a password off the event loop; answer with Session.auth_done()."""

    user: str
    password: str


@dataclass(frozen=True, slots=True)
class OpenPassive:
    """Listen on a port from this node's passive range; answer with passive_ready/passive_failed."""

    extended: bool  # EPSV (port only) vs PASV (address and port)


@dataclass(frozen=True, slots=True)
class SetActive:
    """Connect to (host, port) when the next transfer starts (PORT/EPRT)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ClosePassive:
    """Drop a passive listener nobody will use (REIN, a second PASV)."""


TransferKind = Literal["send_file", "send_lines", "receive_file"]


@dataclass(slots=True)
class Transfer:
    """Move data over the data connection; answer with Session.transfer_done()."""

    kind: TransferKind
    path: str = ""  # real path to read (send_file) or write (receive_file)
    offset: int = 0  # REST position
    ascii: bool = False
    lines: Iterator[bytes] | None = None  # send_lines: already-encoded chunks
    # receive_file: write to temp_path then rename onto path; or append/overwrite path in place
    temp_path: str = ""
    append: bool = False
    exclusive: bool = False  # STOU: never overwrite
    protected: bool = False  # PROT P: the data connection is TLS
    virtual: str = ""  # for logs and xferlog
    command: str = ""
    wrap: Any = None  # stream -> stream: rate limits and upload guards (worker/transfer_limits.py)


@dataclass(frozen=True, slots=True)
class AbortTransfer:
    """Stop the running transfer at once (ABOR); answer with transfer_done(aborted)."""


@dataclass(frozen=True, slots=True)
class RunBlocking:
    """Run a filesystem port call that can block (a listing, STOU's name search) off
    the event loop; answer with Session.blocking_done(its result or exception)."""

    call: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class Close:
    """Flush the replies so far, then close the control connection."""


@dataclass(frozen=True, slots=True)
class Event:
    """Something happened that other parts may count (bans, metrics, logs).
    `name` is an `EventName` (a plain string with the same value works alike)."""

    name: EventName | str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SessionInfo:
    """What an event subscriber may know of the session an event came from: plain
    values kept current by the connection, never the connection itself (so a
    subscriber cannot write to the client, and needs no asyncio to be tested)."""

    session_id: str
    client_ip: str
    user: str | None = None  # logged in as
    pending_user: str | None = None  # named by USER, not logged in yet
    anonymous: bool = False
    home: str = ""  # the logged-in user's home directory on disk
    tls_session_id: bytes | None = None  # the control connection's TLS session, set at login
    log_head: str = ""  # the session log's start of a line for this session (session_log.py), made once
    health_check: bool = False  # a balancer's check (PROXY LOCAL): its connect/disconnect lines at debug

    def real_path(self, virtual: str) -> str:
        """Where a path of the session's view is on disk (as `fs.Home.real_of`)."""
        if not self.home:
            return virtual
        return os.path.join(self.home, virtual.lstrip("/")) if virtual != "/" else self.home


# Subscribers get events; `None` for one outside any session (a failed accept).
Subscriber = Callable[[Event, "SessionInfo | None"], None]


def hears(subscriber: Subscriber, name: str) -> bool:
    """Does `subscriber` want events called `name`? A subscriber names what it hears
    in an `events` attribute (a set of names; see `listens`); one without hears all.
    The node routes by it once per name, so an event nobody hears costs a lookup."""
    events = getattr(subscriber, "events", None)
    return events is None or name in events


def listens(*names: str) -> Callable[[Any], Any]:
    """Mark a subscriber function or method with the event names it hears."""

    def mark(fn: Any) -> Any:
        fn.events = frozenset(names)
        return fn

    return mark

Action = StartTLS | VerifyPassword | OpenPassive | SetActive | ClosePassive | Transfer | AbortTransfer | RunBlocking | Close
Output = Reply | Action | Event


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What the I/O layer reports after a Transfer."""

    status: Literal["ok", "aborted", "no_connection", "failed", "refused"]
    bytes: int = 0
    message: str = ""
    code: int = 0  # overrides the default failure code (e.g. 452 disk full, 522 TLS)
    seconds: float = 0.0
