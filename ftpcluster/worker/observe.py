"""A node's observers: session logs, xferlog and shared-memory metrics subscribe to
session events (built once by services.build_services)."""

from __future__ import annotations

from ..cluster import metrics_layout
from ..cluster.metrics_store import SlotWriter
from ..config import Config
from .commands import load_handlers
from .metrics_events import MetricsSubscriber
from .node_api import NodeCore
from .protocol import Event, EventName, SessionInfo, Subscriber
from .session_log import SessionLogger
from .xferlog import XferLog


def command_verbs() -> list[str]:
    """The verbs the metrics count one by one (the rest as "other")."""
    return sorted(load_handlers())


def open_metrics(cfg: Config, slot: int) -> SlotWriter | None:
    """This node's row of the supervisor-made store, or None (a node run by hand)."""
    try:
        store = metrics_layout.open_existing(cfg, command_verbs())
    except (OSError, ValueError):
        return None
    return store.writer(slot)


def observers(core: NodeCore, metrics: SlotWriter | None) -> list[Subscriber]:
    cfg = core.cfg
    subs: list[Subscriber] = [SessionLogger(core.node_id)]
    if cfg.log.xferlog:
        subs.append(XferLog(str(cfg.resolve(cfg.log.xferlog))))
    if metrics is None:
        return subs
    subs.append(MetricsSubscriber(metrics, frozenset(command_verbs())))
    sessions = core.open_sessions

    def gauge(event: Event, info: SessionInfo | None) -> None:
        if event.name in (EventName.CONNECT, EventName.DISCONNECT):
            metrics.set("ftpcluster_sessions", len(sessions))

    subs.append(gauge)
    return subs
