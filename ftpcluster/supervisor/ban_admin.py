"""The supervisor's share of bans: it creates the host's tables before the nodes
fork, answers `ftpcluster ban|permit|bans`, frees expired records, keeps the
`bans.json` snapshot that carries bans over a restart, and publishes the
active-ban gauges. Runs in the supervisor's loop: every call here is short, and
none talks to memcached (that is the cluster sync thread's job, cluster_sync.py)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable

import structlog

from ..cluster import ban_layout
from ..cluster.ban_layout import host_id
from ..cluster.ban_engine import BanEngine
from ..cluster.ban_names import BanNameError, validate_ban_name
from ..cluster.ban_table import KINDS, Ban
from ..config import Config

log = structlog.get_logger("ftpcluster.ban")
PURGE_EVERY = 10.0
BANS_DEADLINE = 3.0  # seconds `bans` waits for the cluster thread before answering with this host's bans
SNAPSHOT_MAX = 200_000
SNAPSHOT_EVERY = 1.0  # bans.json is rewritten at most this often (and at close): a burst
# of thousands of bans would otherwise rewrite and fsync the whole list for each one
GAUGE_EVERY = 1.0  # the active-ban gauges: recounted after changes at most every 0.25 s, and this often
BULK_ERRORS = 20  # errors a bulk ban reports one by one


class BanAdmin:
    def __init__(self, cfg: Config, metrics: Any = None, cluster: Any = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        fresh = not ban_layout.table_path(cfg).exists()
        table, counters = ban_layout.create_tables(cfg)
        self.engine = BanEngine(cfg, table, counters, origin_host=host_id(cfg))
        self.saved_gen = -1
        self.next_save = 0.0
        self.next_purge = 0.0
        self.extra_bans: list[Callable[[], list[dict[str, Any]]]] = []  # cluster-only bans (memcached)
        self.user_ban_hooks: list[Callable[[str], None]] = []  # e.g. revoke the user's TLS sessions
        self.seen_user_bans: set[tuple[str, str]] = set()
        self.hooks_gen = -1
        self.gauge_gen, self.next_gauge = -1, 0.0
        if fresh:
            self.load_snapshot()
        self.engine.table.purge()
        self.cluster: Any = cluster  # ClusterSync: the arbiter's thread that talks to memcached
        if cluster is not None and cfg.ban.cache == "memcache" and cluster.enable_bans():
            self.engine.on_change.append(cluster.on_change)

    def _count(self, name: str, labels: tuple[str, ...]) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, labels)

    # ------------------------------------------------------------ persistence
    def load_snapshot(self) -> int:
        path = ban_layout.snapshot_path(self.cfg)
        try:
            raw = path.read_bytes()[:SNAPSHOT_MAX * 512]
            items = json.loads(raw)
        except (OSError, ValueError):
            return 0
        now, n = time.time(), 0
        for it in items if isinstance(items, list) else []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                ban = Ban(
                    str(it["store_kind"]), str(it["name"]), float(it["expires_at"]) if it["expires_at"] else None,
                    str(it.get("reason", "")), str(it.get("origin", "local")), float(it.get("created", 0)),
                    bool(it.get("manual")), str(it.get("origin_host", "")),
                )  # fmt: skip
                if ban.kind in KINDS and ban.active(now) and self.engine.table.add(ban):
                    n += 1
        if n:
            log.info("bans restored", count=n, file=str(path))
        return n

    def save_snapshot(self, force: bool = False) -> None:
        gen = self.engine.table.generation()
        if gen == self.saved_gen or (not force and time.monotonic() < self.next_save):
            return
        self.next_save = time.monotonic() + SNAPSHOT_EVERY
        bans = self.engine.active()
        path = ban_layout.snapshot_path(self.cfg)
        tmp = path.with_name(path.name + ".tmp")
        data = [{**b.to_json(), "store_kind": b.kind} for b in bans]
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self.saved_gen = gen
        except OSError as e:
            log.error("cannot save bans", file=str(path), error=e.strerror)

    # ------------------------------------------------------------ loop work
    def tick(self, now: float) -> None:
        self._user_bans()
        if now >= self.next_purge:
            self.next_purge = now + PURGE_EVERY
            self.engine.table.purge()
        self.save_snapshot()
        gen = self.engine.table.generation()
        due = now >= self.next_gauge or (gen != self.gauge_gen and now >= self.next_gauge - GAUGE_EVERY + 0.25)
        if self.metrics is not None and due:
            # a count over every ban: after a change (at most 4 times a second), and once a second for expiries
            self.gauge_gen, self.next_gauge = gen, now + GAUGE_EVERY
            counts = dict.fromkeys(("host", "user", "userhost", "class"), 0)
            for b in self.engine.active():
                counts[b.kind] = counts.get(b.kind, 0) + 1
            for kind, n in counts.items():
                self.metrics.set("ftpcluster_bans_active", n, (kind,))

    def _user_bans(self) -> None:
        """Run the user-ban hooks once for each user or user@host ban that appears."""
        gen = self.engine.table.generation()
        if gen == self.hooks_gen or not self.user_ban_hooks:
            return
        self.hooks_gen = gen
        view, now = self.engine.view, time.time()
        view.refresh()  # incremental: only what changed since the last look
        current = {(b.kind, b.name) for b in list(view.users.values()) if b.active(now)}  # list(): one step
        for kind, name in current - self.seen_user_bans:
            user = name.rpartition("@")[0] if kind == "userhost" else name
            for hook in self.user_ban_hooks:
                try:
                    hook(user)
                except Exception:
                    log.exception("user ban hook failed", user=user)
        self.seen_user_bans = current

    # ------------------------------------------------------------ control commands
    def handle_ban(self, req: dict[str, Any], _pending: Any = None) -> dict[str, Any]:
        """One ban (`name`), or many (`names`, from `ban --from-file`: one reply
        with the count and the first errors, one log line)."""
        kind = str(req.get("kind", ""))
        duration = req.get("duration")
        if duration is not None and (not isinstance(duration, (int, float)) or duration <= 0):
            return {"ok": False, "error": "duration must be a positive number of seconds"}
        reason = str(req.get("reason") or "banned by an operator")[:96]
        names = req.get("names")
        if names is None:
            ban, error = self._ban_one(kind, str(req.get("name", "")), duration, reason)
            if ban is None:
                return {"ok": False, "error": error}
            log.warning("ban added", ban_kind=ban.kind, ban=ban.name, reason=reason, expires_at=ban.expires_at, by="operator")
            self.save_snapshot()
            return {"ok": True, "ban": ban.to_json()}
        if not isinstance(names, list):
            return {"ok": False, "error": "names must be a list"}
        banned, errors = 0, []
        for name in names:
            ban, error = self._ban_one(kind, str(name), duration, reason)
            if ban is not None:
                banned += 1
            else:
                errors.append(error)
        log.warning("bans added", ban_kind=kind, count=banned, failed=len(errors), reason=reason, by="operator")
        self.save_snapshot()
        return {"ok": not errors, "banned": banned, "failed": len(errors), "errors": errors[:BULK_ERRORS],
                **({"error": f"{len(errors)} of {len(names)} not banned"} if errors else {})}  # fmt: skip

    def _ban_one(self, kind: str, name: str, duration: Any, reason: str) -> tuple[Any, str]:
        """(the ban, "") or (None, why not)."""
        try:
            name = validate_ban_name(kind, name, self.cfg)
        except BanNameError as e:
            return None, str(e)
        if kind == "host" and "/" not in name and self.engine.never_ban(name):
            return None, f"{name} is in [ban] never: it is never banned"
        ban = self.engine.ban(kind, name, float(duration) if duration else None, reason, manual=True)
        if ban is None:
            return None, f"ban table full ({self.cfg.ban.table_size} entries of permanent or manual bans)"
        if self.metrics is not None:
            self.metrics.inc("ftpcluster_bans_added_total", ("user" if ban.kind == "userhost" else ban.kind, "local"))
        return ban, ""

    def handle_permit(self, req: dict[str, Any], _pending: Any = None) -> dict[str, Any]:
        try:
            kind = str(req.get("kind", ""))
            name = validate_ban_name(kind, str(req.get("name", "")), self.cfg)
        except BanNameError as e:
            return {"ok": False, "error": str(e)}
        found = self.engine.permit(kind, name)
        log.warning("ban lifted", ban_kind=kind, ban=name, was_local=found, by="operator")
        self.save_snapshot()
        return {"ok": True, "found": found}

    def handle_bans(self, req: dict[str, Any], pending: Any = None) -> dict[str, Any] | None:
        out = [b.to_json() for b in self.engine.active()]
        seen = {(b["kind"], b["name"]) for b in out}
        for extra in self.extra_bans:
            with contextlib.suppress(Exception):
                out += [b for b in extra() if (b["kind"], b["name"]) not in seen]
        if self.cluster is None or not self.cluster.with_bans or pending is None:
            return {"ok": True, "bans": out}

        def answer(fut: Any) -> None:  # on the cluster thread: add the bans only memcached has
            more: list[dict[str, Any]] = []
            with contextlib.suppress(Exception):
                more = [b for b in fut.result() if (b["kind"], b["name"]) not in seen]
            pending.answer({"ok": True, "bans": out + more})

        job = self.cluster.submit(lambda ring, sync: sync.cluster_bans() if sync is not None else [],
                                  deadline=time.monotonic() + BANS_DEADLINE)  # fmt: skip
        job.add_done_callback(answer)
        return None

    def register(self, handlers: dict[str, Any]) -> None:
        handlers.update({"ban": self.handle_ban, "permit": self.handle_permit, "bans": self.handle_bans})

    def close(self) -> None:
        self.save_snapshot(force=True)

