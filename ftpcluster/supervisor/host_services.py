"""What the supervisor keeps for the whole host besides its processes: the metrics
store, the shared-memory files the nodes open after the fork (TLS session cache,
presence), the cluster sync thread (every memcached call of the supervisor), the
ban tables and this host's record in memcached.

Apart from the arbiter so that it stays a process manager: the arbiter asks this
object to tick, to answer ban requests and to rebuild itself on reload. A reload
builds every new piece first; any failure (a file that cannot be opened, no
descriptors left) keeps the running ones."""

from __future__ import annotations

from typing import Any, Callable

import structlog

from ..cluster import metrics_layout
from ..cluster.ban_layout import host_id
from ..cluster.host_registry import HostRegistry
from ..cluster.presence import Presence
from ..cluster.tls_cache import create_cache
from ..cluster.tls_revoke import revoke_user
from ..config import Config
from ..limits import summary as limits_summary
from ..worker.observe import command_verbs
from ..worker.tls import probe_mode
from .ban_admin import BanAdmin
from .cluster_sync import ClusterSync

log = structlog.get_logger("ftpcluster.supervisor")
Handler = Callable[[dict[str, Any], Any], "dict[str, Any] | None"]
TLS_CACHES, TLS_TICKETS = ("internal", "shm", "shm+memcache"), ("off", "local", "cluster")


def open_metrics(cfg: Config) -> tuple[Any, Any]:
    """The host's metrics store and the supervisor's writer into it."""
    store = metrics_layout.create(cfg, command_verbs())
    return store, store.writer(metrics_layout.SUPERVISOR_SLOT)


def shared_state(cfg: Config, writer: Any) -> dict[str, Any]:
    """The TLS session cache the nodes map after the fork, and the TLS mode in force
    (also published as the ftpcluster_tls_mode gauge)."""
    mode = probe_mode(cfg)
    if mode.get("fallback_reason"):
        log.warning("TLS sessions are cached per worker only", reason=mode["fallback_reason"])
    if mode.get("enabled"):
        for c in TLS_CACHES:
            for t in TLS_TICKETS:
                writer.set("ftpcluster_tls_mode", int((c, t) == (mode["session_cache"], mode["session_tickets"])), (c, t))
    return {"tls_cache": create_cache(cfg), "tls_mode": mode}


def new_cluster(cfg: Config) -> Any:
    """A started cluster sync thread for `cfg` (None without memcached)."""
    if not cfg.memcache.enabled:
        return None
    return ClusterSync(cfg).start()


def new_bans(cfg: Config, writer: Any, cluster: Any) -> Any:
    return BanAdmin(cfg, writer, cluster) if cfg.ban.enabled else None


class HostServices:
    """The host-wide parts of one config generation; `handlers` is the control
    socket's request table, into which the ban requests are put."""

    def __init__(self, cfg: Config, handlers: dict[str, Handler]) -> None:
        self.cfg = cfg
        self.handlers = handlers
        self.metrics, self.metrics_writer = open_metrics(cfg)
        self.shared = shared_state(cfg, self.metrics_writer)
        self.presence = Presence(cfg.state_dir / "presence.shm", create=True)  # once: nodes map it
        self.bans: Any = None
        self.cluster: Any = new_cluster(cfg)  # ClusterSync: memcached, on its own thread
        self._use_bans(new_bans(cfg, self.metrics_writer, self.cluster))
        self.registry: Any = None  # this host's record in memcached, for `cluster check`
        self._open_registry(cfg)

    def _use_bans(self, new: Any) -> None:
        if self.bans is not None:
            try:
                self.bans.close()
            except Exception:
                log.exception("closing the previous ban tables failed")
        self.bans = new
        if self.bans is not None:
            self.bans.register(self.handlers)
            self.bans.user_ban_hooks.append(self.revoke_tls)
        else:
            off = lambda req, p: {"ok": False, "error": "bans are disabled ([ban] enabled = false)"}  # noqa: E731
            self.handlers.update({"ban": off, "permit": off, "bans": off})

    def _open_registry(self, cfg: Config) -> None:
        if self.registry is not None:
            self.registry.close()
            self.registry = None
        if cfg.memcache.enabled:
            self.registry = HostRegistry(cfg, host_id(cfg), count=self.cluster.count)
            self.registry.ring.health = self.cluster.health  # its ring lives on the cluster thread too
            self.cluster.periodic.append(self.registry.tick)

    def revoke_tls(self, user: str) -> None:
        """A banned user's cached TLS sessions go, on this host and in memcached (on the
        cluster thread: the supervisor's loop never talks to memcached)."""
        cache = self.shared.get("tls_cache")
        lifetime = self.cfg.tls.session_lifetime
        if self.cluster is not None and self.cfg.tls.session_cache == "memcache":
            mac = self.cluster.mac

            def revoke(ring: Any, _sync: Any) -> None:
                n = revoke_user(user, cache, ring if mac is not None else None, mac, lifetime)
                if n:
                    log.info("TLS sessions revoked", user=user, sessions=n)

            self.cluster.submit(revoke)
        elif cache is not None:
            n = revoke_user(user, cache, None, None, lifetime)
            if n:
                log.info("TLS sessions revoked", user=user, sessions=n)

    def reload(self, new: Config) -> str | None:
        """Move to `new`; an error text (and the running parts kept) when a piece fails."""
        cluster = None
        try:
            metrics, writer = self.metrics, self.metrics_writer
            verbs = command_verbs()
            if metrics_layout.store_path(new, verbs) != metrics_layout.store_path(self.cfg, verbs):
                metrics, writer = open_metrics(new)
            shared = shared_state(new, writer)
            cluster = new_cluster(new)
            bans = new_bans(new, writer, cluster)
        except Exception as e:
            if cluster is not None:
                cluster.stop()
            log.exception("reload failed, keeping the running config")
            return f"reload failed: {type(e).__name__}: {e}"
        self.metrics, self.metrics_writer, self.shared = metrics, writer, shared
        old_cluster, self.cluster = self.cluster, cluster
        self.cfg = new
        self._use_bans(bans)
        if old_cluster is not None:
            old_cluster.stop()  # its thread ends after the call it is in
        try:
            self._open_registry(new)
        except Exception:
            self.registry = None
            log.exception("host registry unavailable after the reload")
        return None

    def tick(self, now: float) -> None:
        if self.bans is not None:
            try:
                self.bans.tick(now)
            except Exception:  # the cluster side must never take the supervisor down
                log.exception("ban maintenance failed")
        if self.cluster is not None:
            self.cluster.publish_metrics(self.metrics_writer)

    def node_gone(self, slot: int) -> None:
        """A node's sessions and gauges go with it."""
        self.presence.clear(slot)
        try:
            self.metrics.zero_gauges(slot)
        except Exception:
            pass

    def status_parts(self) -> list[Callable[[], dict[str, Any]]]:
        """Fields the cluster parts add to `status`; each may fail on its own."""
        return [lambda: self.registry.status() if self.registry is not None else {}, lambda: limits_summary(self.cfg)]

    def close(self) -> None:
        if self.bans is not None:
            self.bans.close()
        if self.cluster is not None:
            self.cluster.stop(wait=1.0)  # before the registry's ring is used from this thread
        if self.registry is not None:
            self.registry.withdraw()
            self.registry.close()
