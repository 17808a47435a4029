"""What `ftpcluster status` answers: the supervisor's nodes, listeners, cluster parts
and the metrics headline, as one JSON-able dict (status_view.py renders it for
people). Kept apart from the arbiter, which only manages processes."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from ..cluster.metrics_store import MetricsStore
from ..config import format_hostport
from .node_table import STATE_NAMES

if TYPE_CHECKING:
    from .arbiter import Arbiter


def headline(metrics: MetricsStore) -> dict[str, int]:
    """The numbers people want first: sessions, logins, bytes, transfers, ban rejects."""
    totals = metrics.totals()
    index = metrics.registry.index

    def get(name: str, *labels: str) -> int:
        i = index.get((name, labels))
        return totals[i] if i is not None else 0

    return {
        "sessions_total": get("ftpcluster_sessions_total"),
        "logins_ok": get("ftpcluster_logins_total", "ok"),
        "logins_failed": get("ftpcluster_logins_total", "failed"),
        "bytes_in": get("ftpcluster_bytes_total", "in"),
        "bytes_out": get("ftpcluster_bytes_total", "out"),
        "transfers": sum(get("ftpcluster_transfers_total", d, st) for d in ("in", "out") for st in ("ok", "aborted", "failed")),
        "ban_rejects": get("ftpcluster_ban_rejects_total"),
    }


def node_rows(arb: "Arbiter", now: float) -> list[dict[str, Any]]:
    rows = []
    for n in sorted(arb.nodes.values(), key=lambda n: (n.generation, n.node_id)):
        v = arb.table.read(n.slot)
        rows.append({
            "id": n.node_id, "pid": n.pid, "sessions": v.sessions, "sessions_total": v.sessions_total,
            "rejected": v.rejected, "state": "draining" if n.stop_deadline else STATE_NAMES.get(v.state, "?"),
            "uptime": round(now - n.started, 1), "passive": f"{n.passive[0]}-{n.passive[1]}",
            "generation": n.generation, "slot": n.slot,
        })  # fmt: skip
    return rows


def build_status(arb: "Arbiter") -> dict[str, Any]:
    now = time.monotonic()
    services = arb.services
    status: dict[str, Any] = {
        "supervisor_pid": arb.pid,
        "uptime": round(now - arb.started, 1),
        "started_at": arb.started_wall,
        "generation": arb.generation,
        "target_nodes": arb.target,
        "restarts": arb.restarts,
        "stopping": arb.stopping,
        "nodes": node_rows(arb, now),
        "listen": [format_hostport(*arb.listeners["control"].getsockname()[:2])],
        "implicit_tls_listen": [format_hostport(*s.getsockname()[:2]) for k, s in arb.listeners.items() if k == "implicit_tls"],
        "passive_ports": arb.cfg.server.passive_ports,
        "tls": services.shared.get("tls_mode", {}),
        "memcache": {"enabled": arb.cfg.memcache.enabled,
                     "servers": services.cluster.status() if services.cluster is not None else []},  # fmt: skip
        "totals": headline(services.metrics),
    }
    for extra in services.status_parts():
        with contextlib.suppress(Exception):
            status.update(extra())
    return status
