"""Ban decisions: BanOnEvent rules over the shared counters, manual bans and
permits, the allow-list, and the text a banned client reads.

I/O-free apart from the two shared-memory tables it is given; nodes call
`event()` for what their sessions report, the supervisor calls `ban()` and
`permit()` for the admin commands. `on_change` hooks (the memcached
write-through) see every ban added or lifted here."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Callable

from ..config import Config
from ..durations import parse_duration
from .ban_counters import EventCounters
from .ban_table import Ban, BanTable, BanView

# What each ProFTPD event bans (see ../shared/notes/proftpd-mod_ban.md).
EVENT_TARGET = {
    "MaxLoginAttempts": "host", "MaxLoginAttemptsFromUser": "userhost", "LoginRate": "user",
    "ClientConnectRate": "host", "MaxConnectionsPerHost": "host", "MaxClientsPerHost": "host",
    "MaxClientsPerUser": "user", "MaxHostsPerUser": "user", "TimeoutIdle": "host", "TimeoutLogin": "host",
    "TimeoutNoTransfer": "host", "UnhandledCommand": "host", "BadProtocol": "host", "EmptyPassword": "host",
    "RootLogin": "host", "TLSHandshake": "host",
}  # fmt: skip


@dataclass(frozen=True)
class Rule:
    event: str
    threshold: int
    window: float
    duration: float | None  # None = permanent
    message: str = ""


def parse_rules(raw: list[dict]) -> list[Rule]:
    rules = []
    for r in raw:
        dur = r.get("duration", "1h")
        rules.append(
            Rule(
                event=r["event"], threshold=int(r.get("threshold", 1)), window=parse_duration(r.get("window", "10m")),
                duration=None if dur in (0, "0", "", "permanent", "forever") else parse_duration(dur),
                message=str(r.get("message", "")),
            )
        )  # fmt: skip
    return rules


def store_kind(kind: str, name: str) -> str:
    """`ban user alice@10.0.0.1` is stored as a user@host ban."""
    return "userhost" if kind == "user" and "@" in name else kind


class BanEngine:
    def __init__(self, cfg: Config, table: BanTable, counters: EventCounters | None, origin_host: str = "") -> None:
        self.cfg = cfg
        self.table = table
        self.counters = counters
        self.view = BanView(table, cfg.ban.classes)
        self.rules = parse_rules(cfg.ban.rules)
        self.by_event: dict[str, list[Rule]] = {}
        for r in self.rules:
            self.by_event.setdefault(r.event, []).append(r)
        self.never = [ipaddress.ip_network(n, strict=False) for n in cfg.ban.never]
        self.origin_host = origin_host
        self.on_change: list[Callable[[str, Ban], None]] = []  # ("add" | "remove", ban)
        self.full_refusals = 0

    # ------------------------------------------------------------ checks
    def never_ban(self, ip: str) -> bool:
        if not self.never or not ip:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in self.never)

    def host_ban(self, ip: str) -> Ban | None:
        b = self.view.host_ban(ip)
        return None if b is None or self.never_ban(ip) else b

    def user_ban(self, user: str, ip: str) -> Ban | None:
        b = self.view.user_ban(user, ip)
        if b is None or (b.kind == "userhost" and self.never_ban(ip)):
            return None
        return b

    def message(self, ban: Ban, ip: str = "", user: str = "", rule_message: str = "") -> str:
        text = rule_message or self.cfg.ban.message
        left = "permanently" if ban.expires_at is None else f"for {max(0, int(ban.expires_at - time.time()))}s"
        for k, v in (("%r", ban.reason or "banned"), ("%u", user or "-"), ("%a", ip or "-"),
                     ("%c", ban.name if ban.kind == "class" else "-"), ("%e", left)):  # fmt: skip
            text = text.replace(k, v)
        return "".join(ch for ch in text if ch.isprintable())[:200]

    # ------------------------------------------------------------ changes
    def ban(self, kind: str, name: str, duration: float | None, reason: str, manual: bool = True,
            origin: str = "local", created: float | None = None, origin_host: str = "") -> Ban | None:  # fmt: skip
        now = time.time()
        ban = Ban(
            store_kind(kind, name), name, None if duration is None else (created or now) + duration, reason, origin,
            created or now, manual, origin_host or self.origin_host,
        )  # fmt: skip
        return self.put(ban)

    def put(self, ban: Ban) -> Ban | None:
        """Add a ban as it is (e.g. one learned from the cluster); None when the table refused it."""
        if not self.table.add(ban):
            self.full_refusals += 1
            return None
        for hook in self.on_change:
            hook("add", ban)
        return ban

    def permit(self, kind: str, name: str) -> bool:
        kind = store_kind(kind, name)
        # The removal names the lifted ban's creation time (the cluster lifts that ban,
        # never a later one); a name not held here: every ban made until now.
        held = next((b for b in self.active() if b.kind == kind and b.name == name), None)
        found = self.table.remove(kind, name)
        gone = Ban(kind, name, None, created=held.created if held is not None else time.time())
        for hook in self.on_change:
            hook("remove", gone)
        return found

    def targets(self, name: str, ip: str, user: str = "") -> list[tuple[Rule, str, str, str]]:
        """(rule, ban kind, ban name, counter key) for each rule this event counts toward."""
        out = []
        for rule in self.by_event.get(name, ()):
            target = EVENT_TARGET.get(name, "host")
            if target == "host":
                key = ip
            elif target == "user":
                key = user
            else:
                key = f"{user}@{ip}" if user else ""
            if key and not (target != "user" and self.never_ban(ip)):
                out.append((rule, target, key, f"{name}|{target}|{key}"))
        return out

    def fire(self, rule: Rule, target: str, key: str, ckey: str, count: int) -> Ban | None:
        if self.counters is not None:
            self.counters.reset(ckey, rule.window)
        return self.ban(target, key, rule.duration, f"{rule.event} reached {count}", manual=False)

    def event(self, name: str, ip: str, user: str = "") -> tuple[Ban, Rule] | None:
        """Count one event on this host; the ban it triggers, if any."""
        if self.counters is None:
            return None
        for rule, target, key, ckey in self.targets(name, ip, user):
            n = self.counters.add(ckey, rule.window)
            if n >= rule.threshold:
                ban = self.fire(rule, target, key, ckey, n)
                if ban is not None:
                    return ban, rule
        return None

    def active(self) -> list[Ban]:
        now = time.time()
        self.view.refresh()
        return [b for b in self.view.bans if b.active(now)]
