"""Prometheus metrics aggregated across the nodes of a host, in shared memory.

Every process (each node, and the supervisor) owns one *slot*: a row of
64-bit counters that only it writes, so increments need no lock and a node
killed mid-write cannot wedge anything. The supervisor sums the rows at
scrape time. A replacement node takes over its predecessor's slot and keeps
counting from where it stopped, so counters stay monotonic across restarts;
gauges of a dead node are zeroed by the supervisor when it reaps it.

The registry (which metric, which label values, which index) is derived from
the config and the command table alone, so every process computes the same
layout without talking."""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..events import BAN_EVENTS

MAGIC = b"FTPCMET1"
HEADER = struct.Struct("<8sII")  # magic, slots, metrics


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str
    kind: str  # counter | gauge
    help: str
    labels: tuple[str, ...] = ()
    values: tuple[tuple[str, ...], ...] = ((),)  # every label combination


BAN_KINDS = ("host", "user", "userhost", "class")

# what memcached serves that must carry a MAC (record_mac.py); "tls" = a sealed session that did not open
RECORD_KINDS = ("ban", "banlog", "banidx", "tlsuser", "tls", "host", "quota")


def default_definitions(verbs: Iterable[str], memcache_servers: Iterable[str]) -> list[MetricDef]:
    verbs_t = tuple((v,) for v in sorted(set(verbs))) + (("other",),)
    servers = tuple(memcache_servers)
    ops = ("get", "set", "add", "incr", "delete", "cas")
    return [
        MetricDef("ftpcluster_sessions", "gauge", "Control sessions open now"),
        MetricDef("ftpcluster_sessions_total", "counter", "Control sessions accepted"),
        MetricDef("ftpcluster_logins_total", "counter", "Login attempts", ("result",), (("ok",), ("failed",))),
        MetricDef("ftpcluster_commands_total", "counter", "FTP commands handled", ("verb",), verbs_t),
        MetricDef("ftpcluster_bytes_total", "counter", "Data bytes moved", ("direction",), (("in",), ("out",))),
        MetricDef(
            "ftpcluster_transfers_total",
            "counter",
            "Data transfers",
            ("direction", "status"),
            tuple((d, s) for d in ("in", "out") for s in ("ok", "aborted", "failed")),
        ),
        MetricDef("ftpcluster_bans_active", "gauge", "Bans in force on this host", ("kind",), tuple((k,) for k in BAN_KINDS)),
        MetricDef("ftpcluster_bans_added_total", "counter", "Bans added", ("kind", "origin"),
                  tuple((k, o) for k in BAN_KINDS for o in ("local", "cluster"))),  # fmt: skip
        MetricDef("ftpcluster_ban_rejects_total", "counter", "Connections or logins refused by a ban"),
        MetricDef("ftpcluster_ban_events_total", "counter", "Ban-rule events seen", ("event",), tuple((e.value,) for e in BAN_EVENTS)),
        MetricDef(
            "ftpcluster_memcache_operations_total",
            "counter",
            "memcached operations",
            ("server", "op"),
            tuple((s, o) for s in servers for o in ops),
        ),
        MetricDef("ftpcluster_memcache_errors_total", "counter", "memcached errors", ("server",), tuple((s,) for s in servers)),
        MetricDef("ftpcluster_memcache_rejected_total", "counter",
                  "Records read from memcached and ignored: no valid MAC under the cluster key", ("kind",),
                  tuple((k,) for k in RECORD_KINDS)),  # fmt: skip
        MetricDef("ftpcluster_memcache_up", "gauge", "1 when the server is in the ring", ("server",), tuple((s,) for s in servers)),
        MetricDef("ftpcluster_tls_handshakes_total", "counter", "TLS handshakes", ("type",), (("full",), ("resumed",), ("failed",))),
        MetricDef(
            "ftpcluster_tls_session_cache_total",
            "counter",
            "TLS session cache operations",
            ("level", "result"),
            tuple((lv, r) for lv in ("L1", "L2") for r in ("hit", "miss", "store", "error", "timeout", "revoked")),
        ),
        MetricDef(
            "ftpcluster_tls_mode",
            "gauge",
            "1 for the TLS session sharing mode in use",
            ("session_cache", "session_tickets"),
            tuple((c, t) for c in ("internal", "shm", "shm+memcache") for t in ("off", "local", "cluster")),
        ),
        MetricDef("ftpcluster_proxy_headers_total", "counter", "PROXY protocol headers", ("result",), (("ok",), ("rejected",))),
        MetricDef("ftpcluster_node_restarts_total", "counter", "Worker nodes restarted by the supervisor"),
        MetricDef("ftpcluster_throttled_bytes_total", "counter", "Bytes moved under a rate limit", ("direction",),
                  (("in",), ("out",))),  # fmt: skip
        MetricDef("ftpcluster_throttle_waits_total", "counter", "Times a rate limit made a transfer wait", ("direction",),
                  (("in",), ("out",))),  # fmt: skip
        MetricDef("ftpcluster_quota_refusals_total", "counter", "Uploads refused (552) by a quota or the maximum size",
                  ("limit", "when"), tuple((lim, w) for lim in ("bytes", "files", "max_upload_size") for w in ("before", "during"))),  # fmt: skip
        MetricDef("ftpcluster_quota_fallbacks_total", "counter", "Usage updates kept on this host because memcached did not answer"),
    ]


class Registry:
    def __init__(self, defs: list[MetricDef]) -> None:
        self.defs = defs
        self.index: dict[tuple[str, tuple[str, ...]], int] = {}
        self.gauges: list[int] = []
        for d in defs:
            for v in d.values:
                i = len(self.index)
                self.index[(d.name, v)] = i
                if d.kind == "gauge":
                    self.gauges.append(i)

    def __len__(self) -> int:
        return len(self.index)


class MetricsStore:
    """The shared file: HEADER, then slots x metrics uint64 (gauges stored as int64)."""

    def __init__(self, path: Path, registry: Registry, slots: int = 128, create: bool = False) -> None:
        self.path = Path(path)
        self.registry = registry
        self.slots = slots
        size = HEADER.size + slots * len(registry) * 8
        size = (size + 4095) // 4096 * 4096
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if create:
            HEADER.pack_into(self._mm, 0, MAGIC, slots, len(registry))
        magic, n_slots, n_metrics = HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC or n_slots != slots or n_metrics != len(registry):
            raise ValueError(f"{self.path}: metrics layout differs (restart the supervisor)")
        # Offset 16 keeps 8-byte alignment for the cast.
        self._cells = memoryview(self._mm)[HEADER.size : HEADER.size + slots * len(registry) * 8].cast("q")

    def writer(self, slot: int) -> "SlotWriter":
        if not 0 <= slot < self.slots:
            raise ValueError(f"metrics slot {slot} out of range 0..{self.slots - 1}")
        return SlotWriter(self, slot)

    def zero_gauges(self, slot: int) -> None:
        base = slot * len(self.registry)
        for i in self.registry.gauges:
            self._cells[base + i] = 0

    def totals(self) -> list[int]:
        n = len(self.registry)
        out = [0] * n
        cells = self._cells
        for slot in range(self.slots):
            base = slot * n
            for i in range(n):
                v = cells[base + i]
                if v:
                    out[i] += v
        return out

    def render(self, extra: dict[tuple[str, tuple[str, ...]], float] | None = None) -> str:
        """Prometheus text exposition; `extra` overrides values computed at scrape time."""
        totals = self.totals()
        lines: list[str] = []
        for d in self.registry.defs:
            lines.append(f"# HELP {d.name} {d.help}")
            lines.append(f"# TYPE {d.name} {d.kind}")
            for v in d.values:
                key = (d.name, v)
                value = extra[key] if extra and key in extra else totals[self.registry.index[key]]
                labels = ",".join(f'{k}="{_escape(x)}"' for k, x in zip(d.labels, v))
                lines.append(f"{d.name}{{{labels}}} {value}" if labels else f"{d.name} {value}")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self._cells.release()
        self._mm.close()


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class SlotWriter:
    """One process's row; only that process writes it."""

    def __init__(self, store: MetricsStore, slot: int) -> None:
        self._cells = store._cells
        self._base = slot * len(store.registry)
        self._index = store.registry.index

    def positions(self, name: str, label_values: Iterable[str]) -> tuple[Any, dict[str, int]]:
        """The cells and, for each value of `name`'s one label, its cell's index there:
        a counter hit per command adds to cells[index] with no lookup of the metric."""
        out = {}
        for v in label_values:
            i = self._index.get((name, (v,)))
            if i is not None:
                out[v] = self._base + i
        return self._cells, out

    def inc(self, name: str, labels: tuple[str, ...] = (), n: int = 1) -> None:
        i = self._index.get((name, labels))
        if i is not None:
            self._cells[self._base + i] += n

    def set(self, name: str, value: int, labels: tuple[str, ...] = ()) -> None:
        i = self._index.get((name, labels))
        if i is not None:
            self._cells[self._base + i] = value
