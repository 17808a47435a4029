"""Session events to the host's shared-memory metrics (see cluster/metrics_store.py)."""

from __future__ import annotations

from typing import Callable

from ..cluster.metrics_store import SlotWriter
from .protocol import BAN_EVENTS, Event, EventName, SessionInfo

_BAN_EVENTS = frozenset(BAN_EVENTS)
_TRANSFER_STATUS = {"ok": "ok", "aborted": "aborted"}


class MetricsSubscriber:
    events = frozenset({EventName.COMMAND, EventName.CONNECT, EventName.LOGIN, EventName.LOGIN_FAILED,
                        EventName.TRANSFER, EventName.TLS_ESTABLISHED, EventName.TLS_FAILED, *_BAN_EVENTS})  # fmt: skip

    def __init__(self, writer: SlotWriter, verbs: frozenset[str]) -> None:
        self.w = writer
        self.verbs = verbs

    def count_command(self, verb: str) -> None:
        """commands_total without an event per command (SessionSettings.on_command)."""
        self.w.inc("ftpcluster_commands_total", (verb if verb in self.verbs else "other",))

    def command_counter(self) -> Callable[[str], None]:
        """count_command() with each verb's cell looked up once: one call per command."""
        cells, at = self.w.positions("ftpcluster_commands_total", (*self.verbs, "other"))
        other = at.get("other")
        if other is None:  # no such metric in this layout
            return self.count_command

        def count(verb: str) -> None:
            cells[at.get(verb, other)] += 1

        return count

    def __call__(self, event: Event, info: SessionInfo | None) -> None:
        name, f, w = event.name, event.fields, self.w
        if name == EventName.COMMAND:
            verb = f.get("verb", "")
            w.inc("ftpcluster_commands_total", (verb if verb in self.verbs else "other",))
        elif name == EventName.CONNECT:
            w.inc("ftpcluster_sessions_total")
        elif name == EventName.LOGIN:
            w.inc("ftpcluster_logins_total", ("ok",))
        elif name == EventName.LOGIN_FAILED:
            w.inc("ftpcluster_logins_total", ("failed",))
        elif name == EventName.TRANSFER:
            direction = "in" if f.get("direction") == "i" else "out"
            w.inc("ftpcluster_bytes_total", (direction,), int(f.get("bytes", 0)))
            w.inc("ftpcluster_transfers_total", (direction, _TRANSFER_STATUS.get(f.get("status", ""), "failed")))
        elif name == EventName.TLS_ESTABLISHED:
            w.inc("ftpcluster_tls_handshakes_total", ("resumed" if f.get("resumed") else "full",))
        elif name == EventName.TLS_FAILED:
            w.inc("ftpcluster_tls_handshakes_total", ("failed",))
        elif name in _BAN_EVENTS:
            w.inc("ftpcluster_ban_events_total", (str(name),))
