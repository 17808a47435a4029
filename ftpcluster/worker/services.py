"""A node's services, built once when the node starts: what it runs besides its
sessions (TLS, logs and metrics, bans, per-host limits, transfer limits, PROXY).

The node holds one `NodeServices` and takes its subscribers, door checks and
login gates from it, in one fixed order; no service attaches itself to the node.
Each service gets what it needs of the node through `node_api.NodeCore`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..cluster.metrics_store import SlotWriter
from .ban_hook import NodeBans, open_bans
from .limits_hook import NodeLimits, open_limits
from .node_api import NodeCore
from .observe import metrics_observers, open_metrics, open_xferlog
from .metrics_events import MetricsSubscriber
from .protocol import EventName, Subscriber, hears
from .proxy_accept import ProxyReceiver, open_proxy
from .session_log import SessionLogger
from .tls import TLSService
from .transfer_limits import NodeTransferLimits
from .xferlog import XferLog

Admission = Callable[[str], "str | None"]  # client ip -> refusal message, or None to admit
UserGate = Callable[[str, str], "str | None"]  # (user, client ip) -> refusal text, or None
Counter = Callable[[str, tuple[str, ...]], None]


def _uncounted(verb: str) -> None:
    """No metrics and no command trace: commands are not counted."""


@dataclass
class NodeServices:
    metrics: SlotWriter | None = None  # this node's row of the host's metrics
    tls: TLSService | None = None  # [tls] enabled: contexts, session store, tickets
    bans: NodeBans | None = None  # [ban] enabled and the host's ban table opened
    limits: NodeLimits | None = None  # any per-host/per-user session limit set
    transfer_limits: NodeTransferLimits | None = None  # rates, quotas, upload size
    proxy: ProxyReceiver | None = None  # [proxy_protocol] enabled
    session_log: SessionLogger | None = None
    xferlog: XferLog | None = None  # [log] xferlog set
    metrics_observers: list[Subscriber] = field(default_factory=list)  # counters per event, gauge

    def subscribers(self) -> list[Subscriber]:
        """Everything that hears session events, in the order it hears them."""
        out: list[Subscriber] = [self.tls.remember_login] if self.tls is not None else []
        out += [log for log in (self.session_log, self.xferlog) if log is not None]
        out += self.metrics_observers
        out += [svc for svc in (self.bans, self.limits, self.transfer_limits) if svc is not None]
        return out

    def command_counter(self) -> Callable[[str], None] | None:
        """What a session calls for each command instead of emitting a COMMAND event
        (an object and a dispatch per command): the metrics' counter, or None when
        another subscriber hears those events too (the command trace at debug)."""
        subs = [s for s in self.subscribers() if hears(s, EventName.COMMAND)]
        counters = [s.command_counter() for s in subs if isinstance(s, MetricsSubscriber)]
        if len(counters) < len(subs):
            return None
        return counters[0] if counters else _uncounted

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): the files services write themselves."""
        if self.xferlog is not None:
            self.xferlog.reopen()

    def admission(self) -> list[Admission]:
        """Checks at the door, before any protocol object: bans first."""
        return [svc.admission for svc in (self.bans, self.limits) if svc is not None]

    def user_gates(self) -> list[UserGate]:
        """Checks at PASS, before the password is verified: bans first."""
        return [svc.user_gate for svc in (self.bans, self.limits) if svc is not None]

    def passive_proxy_reader(self) -> Callable[[Any, Any], Awaitable[str | None]] | None:
        """For passive listeners when PROXY headers come on them too (`passive = true`)."""
        return self.proxy.data_peer if self.proxy is not None and self.proxy.passive else None

    def start(self, core: NodeCore) -> None:
        """Background work, once the node's loop runs."""
        if self.bans is not None:
            core.track(core.loop.create_task(self.bans.watch()))
        if self.transfer_limits is not None:
            core.track(core.loop.create_task(self.transfer_limits.background()))


def build_services(core: NodeCore, count: Counter) -> NodeServices:
    """Every service the config asks for; `count` reaches the metrics row once made."""
    cfg = core.cfg
    tls = TLSService(cfg, count=count, memcache=core.memcache) if cfg.tls.enabled else None
    metrics = open_metrics(cfg, core.slot)
    return NodeServices(
        metrics=metrics,
        tls=tls,
        session_log=SessionLogger(core.node_id),
        xferlog=open_xferlog(cfg),
        metrics_observers=metrics_observers(core, metrics),
        bans=open_bans(core, metrics),
        limits=open_limits(core),
        # always: a user's own limits in the users file need no [limits] key (a transfer
        # without limits costs one dictionary lookup)
        transfer_limits=NodeTransferLimits(core, metrics),
        proxy=open_proxy(cfg.proxy_protocol, core.loop, metrics),
    )
