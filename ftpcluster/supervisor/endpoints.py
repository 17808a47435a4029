"""The supervisor's own sockets on its selector: the control socket (`stop`, `reload`,
`status`, `ban`, ...) and, when [metrics] listen is set, the Prometheus endpoint.
The arbiter opens them once, expires their slow clients every tick and takes their
wake-up hints (a listener paused on EMFILE comes back on time)."""

from __future__ import annotations

import selectors
from typing import Any, Callable

from ..config import Config
from .control_server import ControlServer
from .metrics_http import MetricsHTTP
from .preflight import StartupError


class Endpoints:
    def __init__(self) -> None:
        self.control: ControlServer | None = None
        self.metrics_http: Any = None

    def open(self, cfg: Config, selector: selectors.BaseSelector, handlers: dict[str, Any], render: Callable[[], str]) -> None:
        """Raises StartupError (or OSError for the control socket); closes what it opened."""
        try:
            self.control = ControlServer(cfg.state_dir / "control.sock", selector, handlers)
            if cfg.metrics.listen:
                try:
                    self.metrics_http = MetricsHTTP(cfg.metrics.listen, selector, render)
                except OSError as e:
                    raise StartupError(f"cannot listen on metrics.listen {cfg.metrics.listen}: {e.strerror}") from None
        except BaseException:
            self.close()
            raise

    def servers(self) -> list[Any]:
        return [s for s in (self.control, self.metrics_http) if s is not None]

    def expire(self, now: float) -> None:
        for server in self.servers():
            server.expire(now)

    def wait_hint(self, now: float) -> float | None:
        hints = [h for s in self.servers() if (h := s.listener.wait_hint(now)) is not None]
        return min(hints) if hints else None

    def fds(self) -> list[int]:
        """Descriptors a forked node must close (it never serves the control socket)."""
        return [self.control.sock.fileno()] if self.control is not None else []

    def close(self) -> None:
        for server in self.servers():
            server.close()
        self.control = self.metrics_http = None
