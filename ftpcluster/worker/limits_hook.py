"""Node service: the per-host and per-user limits of `[server]`, counted over every
node of the host (cluster/presence.py), and the ban events they raise.

- `max_connections_per_host`: checked at the door (421, before any session).
- `max_clients_per_host`, `max_clients_per_user`, `max_hosts_per_user`:
  checked at PASS, before the password is verified (530, the session stays).
Each refusal publishes the matching BanOnEvent event (MaxConnectionsPerHost,
MaxClientsPerHost, MaxClientsPerUser, MaxHostsPerUser), so a rule can ban a
client that keeps hitting a limit. Off (0) by default: no cost at all then."""

from __future__ import annotations

from collections import Counter

import structlog

from ..cluster.presence import Presence
from .node_api import NodeCore
from .protocol import Event, EventName, SessionInfo

log = structlog.get_logger("ftpcluster.limits")


class NodeLimits:
    events = frozenset({EventName.CONNECT, EventName.LOGIN, EventName.DISCONNECT})  # protocol.hears

    def __init__(self, server: NodeCore, presence: Presence) -> None:
        s = server.cfg.server
        self.server = server
        self.p = presence
        self.region = server.slot
        self.max_conn, self.max_host = s.max_connections_per_host, s.max_clients_per_host
        self.max_user, self.max_hosts = s.max_clients_per_user, s.max_hosts_per_user
        self.logged: dict[str, tuple[str, str]] = {}  # session id -> (user, ip) counted at login
        self.user_hosts: dict[str, Counter[str]] = {}

    def admission(self, ip: str) -> str | None:
        if self.max_conn and self.p.total("c:" + ip) >= self.max_conn:
            self.server.publish_raw(EventName.MAX_CONNECTIONS_PER_HOST, ip)
            return "421 Too many connections from your host, try again later"
        return None

    def user_gate(self, user: str, ip: str) -> str | None:
        p = self.p
        if self.max_host and p.total("l:" + ip) >= self.max_host:
            event, text = EventName.MAX_CLIENTS_PER_HOST, "Too many logged-in clients from your host"
        elif self.max_user and p.total("u:" + user) >= self.max_user:
            event, text = EventName.MAX_CLIENTS_PER_USER, f"Too many sessions for {user}"
        elif self.max_hosts and p.total(f"uh:{user}|{ip}") == 0 and p.total("hu:" + user) >= self.max_hosts:
            event, text = EventName.MAX_HOSTS_PER_USER, f"Too many hosts logged in as {user}"
        else:
            return None
        self.server.publish_raw(event, ip, user=user)
        log.info("login refused by limit", limit=event, user=user, client=ip)
        return text

    def __call__(self, event: Event, info: SessionInfo | None) -> None:
        if info is None:
            return
        name, p, r = event.name, self.p, self.region
        if name == EventName.CONNECT:
            p.add(r, "c:" + info.client_ip, 1)
        elif name == EventName.LOGIN:
            user, ip = str(event.fields.get("user", "")), info.client_ip
            self.logged[info.session_id] = (user, ip)
            self._login(user, ip, 1)
        elif name == EventName.DISCONNECT:
            p.add(r, "c:" + info.client_ip, -1)
            got = self.logged.pop(info.session_id, None)
            if got is not None:
                self._login(*got, -1)

    def _login(self, user: str, ip: str, n: int) -> None:
        p, r = self.p, self.region
        p.add(r, "l:" + ip, n)
        p.add(r, "u:" + user, n)
        p.add(r, f"uh:{user}|{ip}", n)
        hosts = self.user_hosts.setdefault(user, Counter())
        before = hosts[ip]
        hosts[ip] = max(0, before + n)
        if before == 0 and n > 0:
            p.add(r, "hu:" + user, 1)
        elif before > 0 and hosts[ip] == 0:
            p.add(r, "hu:" + user, -1)
            del hosts[ip]
            if not hosts:
                del self.user_hosts[user]


def open_limits(server: NodeCore) -> NodeLimits | None:
    """The node's session limits, or None: all off, or no presence table (logged)."""
    s = server.cfg.server
    if not (s.max_connections_per_host or s.max_clients_per_host or s.max_clients_per_user or s.max_hosts_per_user):
        return None
    try:
        presence = Presence(server.cfg.state_dir / "presence.shm")
    except (OSError, ValueError) as e:
        log.error("presence table unavailable: per-host limits are not enforced on this node", error=str(e))
        return None
    presence.activate(server.slot)
    return NodeLimits(server, presence)
