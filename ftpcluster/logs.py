"""structlog set-up: JSON lines or console, a file that logrotate can rotate
(reopened on SIGUSR1), and trace channels like ProFTPD's `Trace memcache:20`.

Every logger is bound to a channel (``memcache``, ``tls``, ``ban``, ``proxy``,
``session``, ...). `[log] level` sets the floor; `[log] trace` lowers it for
single channels, so `trace = { memcache = "debug" }` adds memcached detail
without drowning the rest."""

from __future__ import annotations

import asyncio
import atexit
import json
import json.encoder
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, TextIO

import structlog

from .config import LogConfig

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class ReopenableFile:
    """A log file that can be reopened after logrotate moved it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._f: TextIO = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, text: str) -> int:
        with self._lock:
            return self._f.write(text)

    def flush(self) -> None:
        with self._lock:
            self._f.flush()

    def reopen(self) -> None:
        with self._lock:
            old, self._f = self._f, open(self.path, "a", buffering=1, encoding="utf-8")
            old.close()


class _State:
    floor = LEVELS["info"]
    channels: dict[str, int] = {}
    sink: Any = None
    base: dict[str, Any] = {}
    console: Any = None  # structlog's ConsoleRenderer when format = "console", else JSON
    generation = 0  # configure() calls so far: what callers cached of base and format is stale


def _json_default(obj: Any) -> Any:
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def _make_encoder() -> Callable[[dict[str, Any]], str]:
    """The C encoder made once and called directly: json.dumps(default=...) builds
    a new encoder per line, and JSONEncoder.encode two Python layers around it
    (1.8 -> 1.0 us for a session record). Same output as json.dumps."""
    slow = json.JSONEncoder(default=_json_default).encode
    c_make = getattr(json.encoder, "c_make_encoder", None)
    if c_make is None:
        return slow
    # No markers dict (shared by threads it would need a lock): a circular reference
    # ends in RecursionError, and the standard encoder then says what json.dumps says.
    fast = c_make(None, _json_default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)

    def encode(event: dict[str, Any]) -> str:
        try:
            return "".join(fast(event, 0))
        except RecursionError:
            return slow(event)

    return encode


_encode = _make_encoder()
encode_str = json.encoder.encode_basestring_ascii  # a JSON string literal (C), as _encode writes one
encode_json = _encode  # a dictionary as emit() writes it


class LineTemplate:
    """JSON lines with a fixed head and tail, composed as strings: what emit() writes
    for the same fields, in another key order, without a dictionary per line. For
    the session log's hot events (three lines per login, one per transfer)."""

    def __init__(self, level: str, message: str, taken: frozenset[str]) -> None:
        """`taken`: the keys the caller writes itself (base fields of the same name are left out)."""
        self.generation = _State.generation
        base = "".join(f", {encode_str(k)}: {_encode(v)}" for k, v in _State.base.items() if k not in taken)
        self.tail = f", \"event\": {encode_str(message)}{base}, \"level\": {encode_str(level)}, \"timestamp\": \""

    @property
    def current(self) -> bool:
        """Still what configure() set up, and JSON (the console renderer needs the dict)."""
        return self.generation == _State.generation and _State.console is None

    def write(self, head: str) -> None:
        """`head`: '{"key": value, ...' up to the event (no closing brace)."""
        _Batch.write(f"{head}{self.tail}{_Clock.now()}\"}}\n")


class _Clock:
    """ISO-8601 UTC timestamps as structlog's TimeStamper writes them, with the
    date-and-seconds part formatted once a second instead of once a line."""

    second = -1
    prefix = ""

    @classmethod
    def now(cls) -> str:
        t = time.time()
        sec = int(t)
        if sec != cls.second:
            cls.second, cls.prefix = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{cls.prefix}.{int((t - sec) * 1e6):06d}Z"


def _prepare(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Level floor (per channel), base fields, level, timestamp: one processor, not four."""
    level = LEVELS.get(method, 20) if method != "exception" else 40
    channel = event.get("channel")
    floor = _State.channels.get(channel, _State.floor) if channel else _State.floor
    if level < floor:
        raise structlog.DropEvent
    _finish(event, "error" if method == "exception" else method)
    if "exc_info" in event or "exception" in event:
        event = _format_exc_info(logger, method, event)
    return event


def _finish(event: dict[str, Any], level: str) -> None:
    for k, v in _State.base.items():
        event.setdefault(k, v)
    event["level"] = level
    event["timestamp"] = _Clock.now()


_format_exc_info = structlog.processors.format_exc_info


def _render(logger: Any, method: str, event: dict[str, Any]) -> str:
    console = _State.console
    return console(logger, method, event) if console is not None else _encode(event)


def configure(cfg: LogConfig, base_dir: Any = None, **base: Any) -> None:
    """Configure once per process (supervisor, then again in each node with node=...).
    The processor chain is the same every time (what changes lives in _State), so
    structlog may cache each logger on first use."""
    _State.floor = LEVELS.get(cfg.level, 20)
    _State.channels = {ch: LEVELS.get(str(lv).lower(), 10) for ch, lv in cfg.trace.items()}
    _State.base = dict(base)
    _State.generation += 1
    if cfg.file:
        path = cfg.file if os.path.isabs(cfg.file) or base_dir is None else os.path.join(str(base_dir), cfg.file)
        if not isinstance(_State.sink, ReopenableFile) or _State.sink.path != path:
            _State.sink = ReopenableFile(path)
    else:
        _State.sink = sys.stderr
    if cfg.format == "console":
        _State.console = structlog.dev.ConsoleRenderer(colors=_State.sink is sys.stderr and sys.stderr.isatty())
    else:
        _State.console = None
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, _prepare, _render],
        logger_factory=_LineLoggerFactory(),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING)


def emit(method: str, fields: dict[str, Any]) -> None:
    """A record straight to the sink, as a structlog logger bound to `fields` would
    write it (the caller checked `enabled` first): the session log's hot path."""
    _finish(fields, method)
    console = _State.console
    _Batch.write((_encode(fields) if console is None else console(None, method, fields)) + "\n")


# Lines logged on an event loop wait at most this long (or until MAX_PENDING of
# them) and go out in one write: a quiet node's session makes its three lines in
# three loop iterations, so a flush per iteration would still be a write per line.
FLUSH_AFTER = 0.05
MAX_PENDING = 256


class _Batch:
    """Lines logged on an event loop are written together (FLUSH_AFTER), not one
    write(2) per line; other threads write at once (after any that wait)."""

    lock = threading.Lock()
    lines: list[str] = []
    flusher: asyncio.AbstractEventLoop | None = None  # the loop whose call_later flushes the waiting lines

    loops: dict[int, asyncio.AbstractEventLoop] = {}  # thread id -> the loop it last ran

    @classmethod
    def write(cls, line: str) -> None:
        loop = cls._running_loop()
        with cls.lock:
            pending = len(cls.lines)
            if not pending and loop is None:
                _State.sink.write(line)
                _State.sink.flush()
                return
            cls.lines.append(line)  # after any that wait: the order is kept
            if not pending:
                cls.flusher = loop
            elif loop is cls.flusher and pending + 1 < MAX_PENDING:
                return  # this loop runs the flush it scheduled
        if pending:
            flush()  # a thread without a loop, MAX_PENDING lines, or the flusher's loop stopped
        else:
            loop.call_later(FLUSH_AFTER, flush)  # type: ignore[union-attr]

    @classmethod
    def _running_loop(cls) -> asyncio.AbstractEventLoop | None:
        """This thread's running loop. Remembered per thread: on Python 3.11
        asyncio.get_running_loop() makes a getpid(2) call each time."""
        tid = threading.get_ident()
        loop = cls.loops.get(tid)
        if loop is not None and loop.is_running():
            return loop  # running, and in this thread: loops do not nest
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        cls.loops[tid] = loop
        return loop

    @classmethod
    def after_fork(cls) -> None:
        cls.lock, cls.lines, cls.loops, cls.flusher = threading.Lock(), [], {}, None


def flush() -> None:
    """Write what the current loop iteration logged (also called at node exit)."""
    with _Batch.lock:
        if not _Batch.lines:
            return
        text, _Batch.lines = "".join(_Batch.lines), []
        sink = _State.sink
        if sink is not None:
            sink.write(text)
            sink.flush()


class _LineLogger:
    """What structlog's bound loggers call with the rendered line."""

    def msg(self, message: str) -> None:
        _Batch.write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = failure = log = msg


class _LineLoggerFactory:
    def __call__(self, *args: Any) -> _LineLogger:
        return _LineLogger()


def reopen() -> None:
    if isinstance(_State.sink, ReopenableFile):
        _State.sink.reopen()


def enabled(channel: str, level: str = "debug") -> bool:
    """Cheap check before building an expensive trace message."""
    return LEVELS[level] >= _State.channels.get(channel, _State.floor)


atexit.register(flush)
# Pending lines are written before a fork, never by the child as well.
os.register_at_fork(before=flush, after_in_child=_Batch.after_fork)


def get_logger(channel: str, **bound: Any) -> Any:
    """A logger for `channel`, lazy: one made at import time (a module-level `log`)
    takes the configuration `configure` sets later, not the default it would
    freeze with `.bind()` (console lines on stdout: the proxy channel's rejections
    never reached the log file)."""
    return structlog.get_logger("ftpcluster", channel=channel, **bound)
