"""A node's observers: the xferlog and the shared-memory metrics subscribe to
session events (built once by services.build_services)."""

from __future__ import annotations

from ..cluster import metrics_layout
from ..cluster.metrics_store import SlotWriter
from ..config import Config
from .commands import load_handlers
from .metrics_events import MetricsSubscriber
from .node_api import NodeCore
from .protocol import Event, EventName, SessionInfo, Subscriber, listens
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


def open_xferlog(cfg: Config) -> XferLog | None:
    """The wu-ftpd style transfer log when `[log] xferlog` names one."""
    return XferLog(str(cfg.resolve(cfg.log.xferlog))) if cfg.log.xferlog else None


def metrics_observers(core: NodeCore, metrics: SlotWriter | None) -> list[Subscriber]:
    """Counters per event, and the open-sessions gauge."""
    if metrics is None:
        return []
    subs: list[Subscriber] = [MetricsSubscriber(metrics, frozenset(command_verbs()))]
    sessions = core.open_sessions

    @listens(EventName.CONNECT, EventName.DISCONNECT)
    def gauge(event: Event, info: SessionInfo | None) -> None:
        metrics.set("ftpcluster_sessions", len(sessions))

    subs.append(gauge)
    return subs
