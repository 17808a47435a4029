"""Session events to the host's shared-memory metrics (see cluster/metrics_store.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..cluster.metrics_store import BAN_EVENTS, SlotWriter
from .protocol import Event

if TYPE_CHECKING:
    from .control import ControlConnection

_BAN_EVENTS = frozenset(BAN_EVENTS)
_TRANSFER_STATUS = {"ok": "ok", "aborted": "aborted"}


class MetricsSubscriber:
    def __init__(self, writer: SlotWriter, verbs: frozenset[str]) -> None:
        self.w = writer
        self.verbs = verbs

    def __call__(self, event: Event, conn: ControlConnection | None) -> None:
        name, f, w = event.name, event.fields, self.w
        if name == "command":
            verb = f.get("verb", "")
            w.inc("ftpcluster_commands_total", (verb if verb in self.verbs else "other",))
        elif name == "connect":
            w.inc("ftpcluster_sessions_total")
        elif name == "login":
            w.inc("ftpcluster_logins_total", ("ok",))
        elif name == "login_failed":
            w.inc("ftpcluster_logins_total", ("failed",))
        elif name == "transfer":
            direction = "in" if f.get("direction") == "i" else "out"
            w.inc("ftpcluster_bytes_total", (direction,), int(f.get("bytes", 0)))
            w.inc("ftpcluster_transfers_total", (direction, _TRANSFER_STATUS.get(f.get("status", ""), "failed")))
        elif name == "tls_established":
            w.inc("ftpcluster_tls_handshakes_total", ("resumed" if f.get("resumed") else "full",))
        elif name == "tls_failed":
            w.inc("ftpcluster_tls_handshakes_total", ("failed",))
        elif name in _BAN_EVENTS:
            w.inc("ftpcluster_ban_events_total", (name,))
