"""The sans-IO FTP session: command lines in, replies/actions/events out.

Everything about the protocol lives here and in the `handlers_*` modules:
login, the current directory, TYPE, REST, RNFR/RNTO order, PROT, and which
commands may run during a transfer. The asyncio layer (`control.py`) feeds
bytes and performs the actions; tests drive this class with plain strings.

While an asynchronous action is outstanding (a password check, a passive
listener, a transfer) further commands are queued in order, except the
"urgent" ones (ABOR, STAT, NOOP, QUIT) which RFC 959 allows during a transfer.
Which step may follow which is one table, `state.py`; the commands are a table
too (`command_table.py`), passed in so a test can run a session over another."""

from __future__ import annotations

import collections
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .account import User
from .command_table import COMMAND_TABLE
from .commands import Arg, CommandSpec
from .fs import PathError, Resolved
from .fs_port import FS, LocalFS
from .handlers_auth import finish_login
from .handlers_transfer import finish_transfer
from .lines import TOO_LONG, LineBuffer
from .listing import MLST_FACTS
from .parse import FOREIGN_PREFIXES, FOREIGN_PROTOCOL, NOT_IMPLEMENTED, parse_line, verb_of
from .protocol import Action, Close, Event, EventName, Output, Reply, RunBlocking, Transfer, TransferResult
from .replies import os_error_reply, passive_reply
from .state import URGENT_STATES, State, Step, next_state

__all__ = ["MAX_QUEUED_LINES", "Session", "SessionSettings", "State", "User", "os_error_reply", "parse_line"]

MAX_QUEUED_LINES = 32  # queued behind an asynchronous step; then the connection stops reading


@dataclass
class SessionSettings:
    """What a session needs from config, decoupled from the config module."""

    banner: str = "ftpcluster ready"
    max_login_attempts: int = 3
    max_line: int = 4096
    anonymous_root: str = ""
    atomic_uploads: bool = True
    tls_available: bool = False
    tls_required: str = "off"  # off | control | data | both
    implicit_tls: bool = False
    # (user, client ip) -> a refusal text when a ban covers that login; set by the ban hook
    user_gate: Callable[[str, str], str | None] | None = None
    # rates, quotas, max upload size: check(session, transfer) and site_quota(session); set by a node hook
    limits: Any = None
    # verb -> None, called for each command instead of emitting a COMMAND event when only
    # a counter would hear it (set by the node; None: the event, as tests expect)
    on_command: Callable[[str], None] | None = None
    # event name -> whether anyone hears it; an event nobody hears is not made at all
    # (set by the node from its routes; None: every event, as tests expect)
    heard: Callable[[str], bool] | None = None


class Session:
    def __init__(self, settings: SessionSettings, client_ip: str = "", session_id: str = "",
                 commands: Mapping[str, CommandSpec] = COMMAND_TABLE,
                 fs: Callable[[str], FS] = LocalFS) -> None:  # fmt: skip
        self.settings = settings
        self.client_ip = client_ip
        self.session_id = session_id
        self.commands = commands
        self.open_fs = fs  # home directory -> the port the handlers use after login
        self._lines = LineBuffer(settings.max_line)
        self._out: list[Output] = []
        self._queue: collections.deque[bytes | object] = collections.deque()
        self.state = State.READY  # see state.py: the one place that says what may follow what
        # protocol state
        self.user: User | None = None
        self.pending_user: str | None = None
        self.login_failures = 0
        self.home: FS | None = None  # the logged-in user's files (the filesystem port)
        self.cwd = "/"
        self.binary = True
        self.rest = 0
        self.rename_from: Resolved | None = None
        self.data_ready = False  # PASV/EPSV opened or PORT/EPRT set
        self.epsv_all = False
        self.utf8 = True
        self.allo = 0  # ALLO's announced size, for the quota check of the next upload
        self.mlst_facts = list(MLST_FACTS)
        self.tls_control = settings.implicit_tls
        self.pbsz = settings.implicit_tls
        self.prot_private = settings.implicit_tls
        # asynchronous work in flight
        self.transfer: Transfer | None = None
        self.abort_requested = False
        self.quitting = False  # QUIT arrived during a transfer: 221 and close after its reply
        self._then: Callable[[Session, Any], None] | None = None  # continues after RunBlocking
        self._blocking_verb = ""

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def step(self, step: Step) -> None:
        """Move along the transition table (state.py); a step it does not allow raises."""
        self.state = next_state(self.state, step)

    # ------------------------------------------------------------ output API
    def reply(self, code: int, text: str | tuple[str, ...] | list[str]) -> None:
        self._out.append(Reply(code, tuple(text) if isinstance(text, list) else text))

    def act(self, action: Action) -> None:
        self._out.append(action)

    def emit(self, name: EventName, **fields: Any) -> None:
        heard = self.settings.heard
        if heard is None or heard(name):
            self._out.append(Event(name, fields))

    def _take(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def close(self, code: int, text: str) -> None:
        self.reply(code, text)
        self.act(Close())
        self.step(Step.CLOSE)

    # ------------------------------------------------------------ inputs
    def greeting(self) -> list[Output]:
        self.reply(220, self.settings.banner)
        return self._take()

    def receive_data(self, data: bytes) -> list[Output]:
        """Bytes from the control connection; returns what to send and do."""
        lines = self._lines
        if (self.state is State.READY and not self._queue and data[-1:] == b"\n"
                and data.find(b"\n") == len(data) - 1 and len(data) <= lines.max_line + 1 and lines.idle):  # fmt: skip
            # The usual read: one whole command line, nothing buffered before it.
            self._dispatch(data[:-2] if data[-2:-1] == b"\r" else data[:-1])
            return self._take()
        lines.append(data)
        self._pump()
        return self._take()

    @property
    def busy(self) -> bool:
        """A step is out (password check, transfer, ...) or commands wait in the queue:
        what a client that half-closed still gets answers to."""
        return self.state not in (State.READY, State.CLOSED, State.TLS) or (bool(self._queue) and not self.closed)

    @property
    def backlogged(self) -> bool:
        """The I/O layer should stop reading: commands wait behind an asynchronous step
        (a password check, a transfer) and the queue is full. Pipelining is allowed
        (RFC 959), so the rest waits in the socket, not in memory, and nothing is lost."""
        return len(self._queue) >= MAX_QUEUED_LINES and not self.closed

    def _pump(self) -> None:
        """Take buffered lines: run them, or queue them while an asynchronous step is
        outstanding (urgent ones run at once); stop taking lines once the queue is full."""
        while self.state not in (State.CLOSED, State.TLS) and len(self._queue) < MAX_QUEUED_LINES:
            # After AUTH TLS nothing sent in the clear may be taken as a command
            # (STARTTLS command injection, CVE-2011-0411): tls_done() drops the buffer.
            line = self._lines.next_line()
            if line is None:
                return
            if self.state is State.READY:
                self._dispatch(line)
            elif self._is_urgent(line, first=not self._queue):
                self._dispatch(line)
            else:
                self._queue.append(line)

    def _is_urgent(self, line: bytes | object, first: bool) -> bool:
        """May `line` run while an asynchronous step is outstanding? Urgent commands
        (NOOP, STAT, QUIT) and REIN/USER during a transfer run only when nothing is
        queued before them (`first`), so replies keep the order of the commands; ABOR
        alone overtakes queued commands, and only to stop a running transfer."""
        if line is TOO_LONG or self.state not in URGENT_STATES:
            return False
        verb = verb_of(line)  # type: ignore[arg-type]
        spec = self.commands.get(verb)
        if spec is None:
            return False
        if spec.urgent:
            return first or (verb == "ABOR" and self.state is State.TRANSFER)
        return spec.in_transfer and self.state is State.TRANSFER and first

    def _resume(self) -> None:
        """An async step finished: run queued commands until one blocks again, then
        take more of what was left in the line buffer. Lines queued before a transfer
        began wait for its end, except ABOR, which stops it (EPSV, RETR, ABOR in one read)."""
        while self._queue and (self.state is State.READY or self._stops_transfer(self._queue[0])):
            self._dispatch(self._queue.popleft())
        self._pump()

    def _stops_transfer(self, line: bytes | object) -> bool:
        return self.state is State.TRANSFER and line is not TOO_LONG and verb_of(line) == "ABOR"  # type: ignore[arg-type]

    def _dispatch(self, line: bytes | object) -> None:
        if line is TOO_LONG:
            self.reply(500, "Command line too long")
            self.emit(EventName.BAD_PROTOCOL, reason="line too long")
            return
        assert isinstance(line, bytes)
        if self.quitting:
            return  # QUIT came during a transfer: nothing more is read
        verb, arg = parse_line(line)
        if verb is None and line.startswith(FOREIGN_PREFIXES):
            verb = line.split(b"-", 1)[0].decode("ascii")
        if verb is None:
            self.reply(500, "Syntax error: command unrecognized")
            self.emit(EventName.UNHANDLED_COMMAND, command="")
            return
        if verb in FOREIGN_PROTOCOL:
            self.emit(EventName.BAD_PROTOCOL, command=verb)
            self.close(500, "This is an FTP server")
            return
        if verb != "RNTO":
            self.rename_from = None  # RFC 959: RNTO must come right after RNFR
        spec = self.commands.get(verb)
        if spec is None and verb in NOT_IMPLEMENTED:
            self.reply(502, f"{verb} not implemented")
            return
        if spec is None:
            self.reply(500, f"{verb} not understood")
            self.emit(EventName.UNHANDLED_COMMAND, command=verb)
            return
        if not self._allowed(spec, arg):
            return
        on_command = self.settings.on_command
        if on_command is None:
            self.emit(EventName.COMMAND, verb=verb)
        else:
            on_command(verb)
        self._guarded(verb, spec.handler, arg)

    def _guarded(self, verb: str, fn: Callable[[Session, Any], None], arg: Any) -> None:
        """Run a handler (or its continuation): refusals and OS errors become replies."""
        try:
            if isinstance(arg, Exception):
                raise arg  # a blocking call failed: answered like the handler's own error
            fn(self, arg)
        except PathError as e:
            self.reply(550, str(e))
        except OSError as e:
            self.reply(*os_error_reply(e))
        except Exception as e:  # a bug: answer, log it once with its traceback, go on
            self.reply(451, "Local error in processing")
            self.emit(EventName.HANDLER_ERROR, command=verb, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())

    def _allowed(self, spec: CommandSpec, arg: str) -> bool:
        if spec.arg is Arg.REQUIRED and not arg:
            self.reply(501, f"Syntax error: {spec.verb} needs an argument")
            return False
        if spec.arg is Arg.NONE and arg:
            self.reply(501, f"Syntax error: {spec.verb} takes no argument")
            return False
        if spec.auth and self.user is None:
            self.reply(530, "Please log in with USER and PASS first")
            return False
        if spec.write and self.user is not None and self.user.read_only:
            self.reply(550, "Permission denied: read-only account")
            return False
        if self.state is State.TRANSFER and not (spec.urgent or spec.in_transfer):
            self.reply(450, "A transfer is in progress")
            return False
        return True

    # ------------------------------------------------------------ async results
    def auth_done(self, user: User | None) -> list[Output]:
        self.step(Step.AUTH_DONE)
        finish_login(self, user)
        self._resume()
        return self._take()

    def passive_ready(self, host: str, port: int, extended: bool) -> list[Output]:
        self.step(Step.PASSIVE_DONE)
        self.data_ready = True
        self.reply(*passive_reply(host, port, extended))
        self._resume()
        return self._take()

    def passive_failed(self, message: str) -> list[Output]:
        self.step(Step.PASSIVE_DONE)
        self.data_ready = False
        self.reply(425, message)
        self._resume()
        return self._take()

    def transfer_done(self, result: TransferResult) -> list[Output]:
        self.step(Step.TRANSFER_DONE)
        finish_transfer(self, result)
        self._resume()
        return self._take()

    def blocking_done(self, result: Any) -> list[Output]:
        """A RunBlocking call returned `result` (or raised it): the handler goes on."""
        self.step(Step.BLOCKING_DONE)
        then, self._then = self._then, None
        if then is not None and not self.closed:
            self._guarded(self._blocking_verb, then, result)
        self._resume()
        return self._take()

    def passive_expired(self) -> None:
        """The I/O layer closed a passive listener no transfer used within data_timeout:
        the next transfer command needs a new PASV/EPSV (425 otherwise)."""
        self.data_ready = False

    @property
    def hello_read_early(self) -> bool:
        """The client sent its ClientHello behind AUTH TLS without waiting for the 234:
        we read it as command bytes, so a handshake would wait for it in vain."""
        return self._lines.peek(2) == b"\x16\x03"

    def tls_done(self) -> list[Output]:
        """The control connection is now TLS (after AUTH TLS)."""
        self.step(Step.TLS_DONE)
        self.tls_control = True
        self._lines = LineBuffer(self.settings.max_line)
        self._queue.clear()  # sent in the clear behind AUTH TLS: never commands
        return self._take()

    def timed_out(self, what: str) -> list[Output]:
        """Idle or login timeout: tell the client why, then close."""
        event = {"login": EventName.TIMEOUT_LOGIN, "idle": EventName.TIMEOUT_IDLE,
                 "no_transfer": EventName.TIMEOUT_NO_TRANSFER}[what]
        self.emit(event)
        text = "No transfer timeout" if what == "no_transfer" else f"{what.capitalize()} timeout"
        self.close(421, f"{text}: closing control connection")
        return self._take()

    # ------------------------------------------------------------ helpers for handlers
    def resolve(self, arg: str, must_exist: bool = False) -> Resolved:
        assert self.home is not None
        return self.home.resolve(self.cwd, arg, must_exist)

    def resolve_entry(self, arg: str, must_exist: bool = False) -> Resolved:
        """The directory entry itself, a final symlink not followed (DELE, RMD, RNFR, RNTO)."""
        assert self.home is not None
        return self.home.resolve_entry(self.cwd, arg, must_exist)

    def run_blocking(self, verb: str, call: Callable[[], Any], then: Callable[[Session, Any], None]) -> None:
        """Have the I/O layer run `call` (a port call that can block) off the loop, then
        `then(session, result)`; commands that arrive meanwhile wait in order."""
        self.step(Step.RUN_BLOCKING)
        self._then = then
        self._blocking_verb = verb
        self.act(RunBlocking(call))

    @property
    def fs(self) -> FS:
        """The logged-in user's files (handlers that need a login only run after it)."""
        assert self.home is not None
        return self.home

    def open_home(self, root: str) -> None:
        self.home = self.open_fs(root)
        self.cwd = "/"

    def reset_login(self) -> None:
        self.user = None
        self.pending_user = None
        self.home = None
        self.cwd = "/"
        self.rest = 0
        self.rename_from = None
