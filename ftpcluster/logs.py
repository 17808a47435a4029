"""structlog set-up: JSON lines or console, a file that logrotate can rotate
(reopened on SIGUSR1), and trace channels like ProFTPD's `Trace memcache:20`.

Every logger is bound to a channel (``memcache``, ``tls``, ``ban``, ``proxy``,
``session``, ...). `[log] level` sets the floor; `[log] trace` lowers it for
single channels, so `trace = { memcache = "debug" }` adds memcached detail
without drowning the rest."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TextIO

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


def _filter(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    level = LEVELS.get(method, 20) if method != "exception" else 40
    channel = event.get("channel")
    floor = _State.channels.get(channel, _State.floor) if channel else _State.floor
    if level < floor:
        raise structlog.DropEvent
    return event


def _add_base(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    for k, v in _State.base.items():
        event.setdefault(k, v)
    return event


def configure(cfg: LogConfig, base_dir: Any = None, **base: Any) -> None:
    """Configure once per process (supervisor, then again in each node with node=...)."""
    _State.floor = LEVELS.get(cfg.level, 20)
    _State.channels = {ch: LEVELS.get(str(lv).lower(), 10) for ch, lv in cfg.trace.items()}
    _State.base = dict(base)
    if cfg.file:
        path = cfg.file if os.path.isabs(cfg.file) or base_dir is None else os.path.join(str(base_dir), cfg.file)
        if not isinstance(_State.sink, ReopenableFile) or _State.sink.path != path:
            _State.sink = ReopenableFile(path)
    else:
        _State.sink = sys.stderr
    console = cfg.format == "console"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _filter,
        _add_base,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=_State.sink is sys.stderr and sys.stderr.isatty()))
    else:
        processors.append(structlog.processors.JSONRenderer())
    structlog.configure(
        processors=processors,
        logger_factory=structlog.PrintLoggerFactory(file=_Sink()),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING)


class _Sink:
    """Indirection so a reopen swaps the file under every existing logger."""

    def write(self, text: str) -> int:
        return _State.sink.write(text)

    def flush(self) -> None:
        _State.sink.flush()


def reopen() -> None:
    if isinstance(_State.sink, ReopenableFile):
        _State.sink.reopen()


def enabled(channel: str, level: str = "debug") -> bool:
    """Cheap check before building an expensive trace message."""
    return LEVELS[level] >= _State.channels.get(channel, _State.floor)


def get_logger(channel: str, **bound: Any) -> Any:
    return structlog.get_logger("ftpcluster").bind(channel=channel, **bound)
