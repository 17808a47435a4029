"""Node service: bans at the door, at login and on sessions already open.

- Admission (before any protocol object or TLS): a banned address gets
  `530 <message>` and a close, counted, never logged per connection.
- Login: USER/PASS of a banned user or user@host gets 530 with the message;
  the session stays (as in ProFTPD).
- Events the sessions report feed the BanOnEvent rules; a rule that fires bans
  and ends the matching sessions of this node at once. Other nodes (and bans
  made by the supervisor) are noticed by a watcher that polls the table's
  generation four times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from ..cluster.ban_engine import EVENT_TARGET, BanEngine
from ..cluster.ban_layout import host_id, open_tables
from ..cluster.ban_table import Ban
from ..cluster.cluster_counters import ClusterCounters
from ..cluster.metrics_store import SlotWriter
from ..cluster.record_mac import load_record_mac
from ..config import Config
from .node_api import NodeCore
from .protocol import Event, EventName, SessionInfo

log = structlog.get_logger("ftpcluster.ban")
trace = structlog.get_logger("ftpcluster.trace.ban")
WATCH_INTERVAL = 0.25
# Session events that are rule events under another name.
ALIASES = {EventName.LOGIN: EventName.LOGIN_RATE}


MAX_PENDING = 1000  # cluster counts queued for the memcached thread; more are dropped
COUNT_DEADLINE = 2.0  # seconds a cluster count may wait for the memcached thread


class NodeBans:
    # Rule events, under their own name or an alias (protocol.hears); which rules are
    # configured is checked per event.
    events = frozenset(n for n in EventName if ALIASES.get(n, n) in EVENT_TARGET)

    def __init__(self, server: NodeCore, engine: BanEngine, metrics: SlotWriter | None = None) -> None:
        self.server = server
        self.engine = engine
        self.metrics = metrics
        self.gen = engine.view.gen
        self.rate_rule = "ClientConnectRate" in engine.by_event
        cfg = server.cfg
        self.cluster = cfg.memcache.enabled and cfg.ban.cache == "memcache" and bool(engine.rules)
        self.memcache: Any = None  # the node's memcached thread (cluster-wide counts)
        self._counter_name: Any = None
        self.pending = 0
        self.dropped = 0
        if self.cluster:
            self.memcache = server.memcache()

    # ------------------------------------------------------------ cluster-wide counts
    def _cluster_count(self, ring: Any, ckey: str, window: float) -> float | None:
        """On the memcached thread; the cluster key (read there, once) names the counters."""
        if self._counter_name is None:
            # SealError without a cluster key: the count fails, the host count alone decides
            self._counter_name = load_record_mac(self.server.cfg, ring.prefix).counter_name
        return ClusterCounters(ring, self._counter_name).add(ckey, window)

    def count_cluster(self, name: str, ip: str, user: str) -> None:
        if self.memcache is None:
            return
        for rule, target, key, ckey in self.engine.targets(name, ip, user):
            if self.pending >= MAX_PENDING:
                self.dropped += 1
                continue
            self.pending += 1
            # a count that waited longer than a second in the queue is stale: dropped unrun
            fut = self.memcache.submit(lambda ring, ck=ckey, w=rule.window: self._cluster_count(ring, ck, w),
                                       deadline=time.monotonic() + COUNT_DEADLINE)  # fmt: skip
            fut.add_done_callback(
                lambda f, r=rule, t=target, k=key, ck=ckey: self.server.loop.call_soon_threadsafe(self._counted, f, r, t, k, ck)
            )  # fmt: skip

    def _counted(self, fut: Any, rule: Any, target: str, key: str, ckey: str) -> None:
        self.pending -= 1
        try:
            total = fut.result()
        except Exception:
            return
        if total is None or total < rule.threshold:
            return
        if (target == "host" and self.engine.host_ban(key)) or (target != "host" and self.engine.view.users.get(key)):
            return  # already banned (by this host's count or another node)
        ban = self.engine.fire(rule, target, key, ckey, int(total))
        if ban is not None:
            ip, _, user = (key, "", "") if target == "host" else ("", "", key)
            self._added(ban, ip, user)
            self.kick_matching(rule.message)

    def _count(self, name: str, labels: tuple[str, ...] = (), n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, labels, n)

    # ------------------------------------------------------------ the door
    def admission(self, ip: str) -> str | None:
        ban = self.engine.host_ban(ip)
        if ban is None and self.rate_rule:
            fired = self.engine.event(EventName.CLIENT_CONNECT_RATE, ip)
            if fired is not None:
                self._added(fired[0], ip, "")
                ban = fired[0]
            else:
                self.count_cluster(EventName.CLIENT_CONNECT_RATE, ip, "")
        if ban is None:
            return None
        self._count("ftpcluster_ban_rejects_total")
        return "530 " + self.engine.message(ban, ip)

    def user_gate(self, user: str, ip: str) -> str | None:
        ban = self.engine.user_ban(user, ip)
        if ban is None:
            return None
        self._count("ftpcluster_ban_rejects_total")
        log.info("login refused by ban", user=user, client=ip, ban_kind=ban.kind, ban=ban.name)
        return self.engine.message(ban, ip, user)

    # ------------------------------------------------------------ events
    def __call__(self, event: Event, info: SessionInfo | None) -> None:
        name = ALIASES.get(event.name, event.name)
        if name not in EVENT_TARGET or name not in self.engine.by_event:
            return
        ip = info.client_ip if info is not None else str(event.fields.get("ip", ""))
        user = str(event.fields.get("user") or (info.user if info is not None else "") or "")
        fired = self.engine.event(name, ip, user)
        if fired is not None:
            ban, rule = fired
            self._added(ban, ip, user)
            self.kick_matching(rule.message)
        else:
            self.count_cluster(name, ip, user)

    def _added(self, ban: Ban, ip: str, user: str) -> None:
        self._count("ftpcluster_bans_added_total", ("user" if ban.kind == "userhost" else ban.kind, ban.origin))
        log.warning("ban added", ban_kind=ban.kind, ban=ban.name, client=ip, user=user or None, reason=ban.reason,
                    expires_at=ban.expires_at)  # fmt: skip

    # ------------------------------------------------------------ sessions already open
    def kick_matching(self, rule_message: str = "") -> int:
        engine, n = self.engine, 0
        for conn in list(self.server.open_sessions):
            if conn.closing:
                continue
            user = conn.user_name or ""
            ban = engine.host_ban(conn.client_ip) or (engine.user_ban(user, conn.client_ip) if user else None)
            if ban is not None:
                conn.kick(530, engine.message(ban, conn.client_ip, user, rule_message))
                trace.debug("session ended by ban", client=conn.client_ip, user=user or None, ban=ban.name)
                n += 1
        return n

    async def watch(self) -> None:
        while not self.server.stopped.is_set():
            with contextlib.suppress(Exception):
                if self.engine.view.refresh():
                    self.kick_matching()
            await asyncio.sleep(WATCH_INTERVAL)


def open_engine(cfg: Config) -> BanEngine:
    table, counters = open_tables(cfg)
    return BanEngine(cfg, table, counters, origin_host=host_id(cfg))


def open_bans(server: NodeCore, metrics: SlotWriter | None) -> NodeBans | None:
    """The node's bans, or None: `[ban]` off, or no ban table (logged)."""
    if not server.cfg.ban.enabled:
        return None
    try:
        engine = open_engine(server.cfg)
    except (OSError, ValueError) as e:
        log.error("ban table unavailable: bans are not enforced on this node", error=str(e))
        return None
    return NodeBans(server, engine, metrics)
