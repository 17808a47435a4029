"""Node hook: session logs, xferlog and shared-memory metrics subscribe to session events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .metrics_events import MetricsSubscriber
from .session_log import SessionLogger

if TYPE_CHECKING:
    from .node import NodeServer


def attach_observability(server: NodeServer) -> None:
    cfg = server.cfg
    server.subscribers.append(SessionLogger(server.node_id))
    if cfg.log.xferlog:
        from .xferlog import XferLog

        server.subscribers.append(XferLog(str(cfg.resolve(cfg.log.xferlog))))
    try:
        from ..cluster import metrics_layout

        store = metrics_layout.open_existing(cfg)
    except (OSError, ValueError):
        return  # no supervisor-made store (a node run by hand): no metrics
    writer = store.writer(server.ctx.slot)
    server.metrics = writer  # type: ignore[attr-defined]  # other hooks count through it
    from .commands import load_handlers

    server.subscribers.append(MetricsSubscriber(writer, frozenset(load_handlers())))
    sessions = server.sessions

    def gauge(event, conn) -> None:  # type: ignore[no-untyped-def]
        if event.name in ("connect", "disconnect"):
            writer.set("ftpcluster_sessions", len(sessions))

    server.subscribers.append(gauge)
