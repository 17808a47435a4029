"""The supervisor's loop, after gunicorn's arbiter: signal handlers only queue the
signal and wake the loop; one loop does all the work.

Every tick: run queued signals and control requests, reap children, kill nodes
whose shared-memory heartbeat is stale, then converge: as many nodes of the
current generation as the target, none of older generations (they drain).
Reload = bump the generation. The listeners are bound once, before the first
fork, and never close, so a connection arriving during a reload waits in the
backlog instead of being refused."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, Callable

import structlog

from .. import config as config_mod
from ..config import Config, format_hostport
from ..limits import summary as limits_summary
from . import systemd
from .control_server import ControlServer, Pending
from .node_process import BOOT_ERROR, NodeHandle, spawn
from .node_table import ACCEPTING, FREE, STATE_NAMES, NodeTable, passive_slices
from .preflight import StartupError, check

log = structlog.get_logger("ftpcluster.supervisor")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                   signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1)  # fmt: skip
MAX_BOOT_FAILURES = 5
BOOT_TIMEOUT = 30.0
FAST_STOP_GRACE = 5.0
MAX_NODES = 64


class Arbiter:
    def __init__(self, cfg: Config, listeners: dict[str, socket.socket], ready_fd: int | None = None) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.ready_fd = ready_fd  # --daemon: the waiting parent reads "ok" or an error from here
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.target = cfg.server.nodes
        self.generation = 1
        self.nodes: dict[int, NodeHandle] = {}
        self.table = NodeTable()
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Liveness pipe: nodes keep the read end; EOF there means the supervisor is gone.
        self.alive_r, self.alive_w = os.pipe()
        os.set_inheritable(self.alive_r, True)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._drain_wake)
        self.stopping: str | None = None  # None | "graceful" | "fast"
        self.stop_waiters: list[Pending] = []
        self.reload_waiters: list[Pending] = []
        self.boot_failures = 0
        self.next_spawn_at = 0.0
        self.exit_code = 0
        self.halt_reason = ""
        self.ready_sent = False
        self.restarts = 0
        self.watchdog = systemd.watchdog_interval()
        self.last_watchdog = 0.0
        self.node_hooks: list[Callable[[Any], None]] = default_node_hooks()
        self.extra_status: list[Callable[[], dict[str, Any]]] = []  # cluster parts add their fields
        self.handlers: dict[str, Callable[[dict[str, Any], Pending], dict[str, Any] | None]] = {
            "status": lambda req, p: {"ok": True, "status": self.status()},
            "stop": self._cmd_stop,
            "reload": self._cmd_reload,
            "ping": lambda req, p: {"ok": True},
        }
        self.control: ControlServer | None = None
        self.metrics_http: Any = None
        self.metrics = self._metrics_store()
        self.shared = self._shared_state(cfg)
        from ..cluster.presence import Presence

        self.presence = Presence(cfg.state_dir / "presence.shm", create=True)  # once: nodes map it
        self.bans: Any = None
        # ClusterSync: every memcached call of the supervisor, on its own thread
        self.cluster: Any = self._new_cluster(cfg)
        self._use_bans(self._new_bans(cfg, self.metrics_writer, self.cluster))
        self.registry: Any = None  # this host's record in memcached, for `cluster check`
        self._open_registry(cfg)
        self.extra_status.append(lambda: self.registry.status() if self.registry is not None else {})
        self.extra_status.append(lambda: limits_summary(self.cfg))  # the [limits] in force

    def _new_cluster(self, cfg: Config) -> Any:
        """A started cluster sync thread for `cfg` (None without memcached); the
        caller stops the previous one once everything new is in place."""
        if not cfg.memcache.enabled:
            return None
        from .cluster_sync import ClusterSync

        return ClusterSync(cfg).start()

    def _new_bans(self, cfg: Config, metrics_writer: Any, cluster: Any) -> Any:
        """The new BanAdmin is built before the old one closes: if that fails
        (a table that cannot be opened, no descriptors left) the old one stays."""
        from .ban_admin import BanAdmin

        return BanAdmin(cfg, metrics_writer, cluster) if cfg.ban.enabled else None

    def _use_bans(self, new: Any) -> None:
        if self.bans is not None:
            try:
                self.bans.close()
            except Exception:
                log.exception("closing the previous ban tables failed")
        self.bans = new
        if self.bans is not None:
            self.bans.register(self.handlers)
            self.bans.user_ban_hooks.append(self._revoke_tls)
        else:
            off = lambda req, p: {"ok": False, "error": "bans are disabled ([ban] enabled = false)"}  # noqa: E731
            self.handlers.update({"ban": off, "permit": off, "bans": off})

    def _open_registry(self, cfg: Config) -> None:
        if self.registry is not None:
            self.registry.close()
            self.registry = None
        if cfg.memcache.enabled:
            from ..cluster.ban_layout import host_id
            from ..cluster.host_registry import HostRegistry

            self.registry = HostRegistry(cfg, host_id(cfg), count=self.cluster.count)
            self.registry.ring.health = self.cluster.health  # its ring lives on the cluster thread too
            self.cluster.periodic.append(self.registry.tick)

    def _revoke_tls(self, user: str) -> None:
        """A banned user's cached TLS sessions go, on this host and in memcached (on the
        cluster thread: the loop never talks to memcached)."""
        from ..cluster.tls_revoke import revoke_user

        cache = self.shared.get("tls_cache")
        if self.cluster is not None and self.cfg.tls.session_cache == "memcache":
            mac = self.cluster.mac

            def revoke(ring: Any, _sync: Any) -> None:
                n = revoke_user(user, cache, ring if mac is not None else None, mac)
                if n:
                    log.info("TLS sessions revoked", user=user, sessions=n)

            self.cluster.submit(revoke)
        elif cache is not None:
            n = revoke_user(user, cache, None, None)
            if n:
                log.info("TLS sessions revoked", user=user, sessions=n)

    def _shared_state(self, cfg: Config) -> dict[str, Any]:
        """Host-wide shared-memory files the nodes open after the fork (kept on reload)."""
        from ..worker import tls

        mode = tls.probe_mode(cfg)
        if mode.get("fallback_reason"):
            log.warning("TLS sessions are cached per worker only", reason=mode["fallback_reason"])
        if mode.get("enabled"):
            for c in ("internal", "shm", "shm+memcache"):
                for t in ("off", "local", "cluster"):
                    self.metrics_writer.set("ftpcluster_tls_mode", int((c, t) == (mode["session_cache"], mode["session_tickets"])), (c, t))
        return {"tls_cache": tls.create_cache(cfg), "tls_mode": mode}

    # ------------------------------------------------------------ metrics
    def _metrics_store(self) -> Any:
        from ..cluster import metrics_layout

        store = metrics_layout.create(self.cfg)
        self.metrics_writer = store.writer(metrics_layout.SUPERVISOR_SLOT)
        return store

    def render_metrics(self) -> str:
        return self.metrics.render()

    def _start_metrics_http(self) -> None:
        if self.cfg.metrics.listen and self.metrics_http is None:
            from .metrics_http import MetricsHTTP

            try:
                self.metrics_http = MetricsHTTP(self.cfg.metrics.listen, self.selector, self.render_metrics)
            except OSError as e:
                raise StartupError(f"cannot listen on metrics.listen {self.cfg.metrics.listen}: {e.strerror}") from None

    def headline(self) -> dict[str, int]:
        """The numbers people want first, for `status`."""
        totals = self.metrics.totals()
        index = self.metrics.registry.index

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

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b".")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.wake_r, 4096):
                pass

    def install_signals(self) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def handle_signal(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            return  # reaping happens every tick
        if sig == signal.SIGTERM:
            self.begin_stop("graceful", self.cfg.server.graceful_timeout)
        elif sig in (signal.SIGINT, signal.SIGQUIT):
            self.begin_stop("fast", FAST_STOP_GRACE)
        elif sig == signal.SIGHUP:
            self.reload()
        elif sig == signal.SIGTTIN:
            self.target = min(MAX_NODES, self.target + 1)
            log.info("node count raised", target=self.target)
        elif sig == signal.SIGTTOU:
            self.target = max(1, self.target - 1)
            log.info("node count lowered", target=self.target)
        elif sig == signal.SIGUSR1:
            from ..logs import reopen

            reopen()
            self.signal_nodes(signal.SIGUSR1)

    # ------------------------------------------------------------ control requests
    def _cmd_stop(self, req: dict[str, Any], p: Pending) -> None:
        timeout = req.get("timeout")
        if not isinstance(timeout, (int, float)) or timeout < 0:
            timeout = self.cfg.server.graceful_timeout
        self.stop_waiters.append(p)
        self.begin_stop("fast" if req.get("fast") else "graceful", float(timeout))
        return None

    def _cmd_reload(self, req: dict[str, Any], p: Pending) -> dict[str, Any] | None:
        error = self.reload()
        if error:
            return {"ok": False, "error": error}
        self.reload_waiters.append(p)  # answered once the new generation accepts
        return None

    # ------------------------------------------------------------ lifecycle
    def begin_stop(self, how: str, timeout: float) -> None:
        if self.stopping == "fast" or (self.stopping == "graceful" and how == "graceful"):
            return
        self.stopping = how
        systemd.notify("STOPPING=1")
        log.info("stopping", how=how, timeout=timeout)
        deadline = time.monotonic() + timeout
        sig = signal.SIGTERM if how == "graceful" else signal.SIGQUIT
        for node in self.nodes.values():
            self._ask_stop(node, sig, deadline)

    def _ask_stop(self, node: NodeHandle, sig: int, deadline: float) -> None:
        if node.stop_deadline is None or deadline < node.stop_deadline:
            node.stop_deadline = deadline
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, sig)

    def reload(self) -> str | None:
        """Re-read the config, users and certificates; new nodes, old ones drain. Returns an error text."""
        if self.stopping:
            return "stopping"
        try:
            new = config_mod.load(str(self.cfg.path) if self.cfg.path else None)
            check(new)
        except (config_mod.ConfigError, StartupError) as e:
            log.error("reload refused, keeping the running config", error=str(e))
            return f"reload refused: {e}"
        if new.listen_address != self.cfg.listen_address or new.implicit_tls_address != self.cfg.implicit_tls_address:
            log.warning("listen addresses changed: they take effect at the next restart")
            new.server.listen, new.server.implicit_tls_listen = self.cfg.server.listen, self.cfg.server.implicit_tls_listen
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        from ..cluster import metrics_layout

        # Everything new is built first; any failure (a file that cannot be
        # opened, no descriptors left) keeps the running config and nodes.
        cluster = None
        try:
            metrics, writer = self.metrics, self.metrics_writer
            if metrics_layout.store_path(new) != metrics_layout.store_path(self.cfg):
                metrics = metrics_layout.create(new)
                writer = metrics.writer(metrics_layout.SUPERVISOR_SLOT)
            shared = self._shared_state(new)
            cluster = self._new_cluster(new)
            bans = self._new_bans(new, writer, cluster)
        except Exception as e:
            if cluster is not None:
                cluster.stop()
            log.exception("reload failed, keeping the running config")
            systemd.notify("READY=1")
            return f"reload failed: {type(e).__name__}: {e}"
        self.metrics, self.metrics_writer, self.shared = metrics, writer, shared
        old_cluster, self.cluster = self.cluster, cluster
        self._use_bans(bans)
        if old_cluster is not None:
            old_cluster.stop()  # its thread ends after the call it is in
        try:
            self._open_registry(new)
        except Exception:
            self.registry = None
            log.exception("host registry unavailable after the reload")
        self.cfg = new
        self.generation += 1
        self.ready_sent = False
        self.boot_failures = 0
        log.info("reloading", generation=self.generation)
        return None

    def signal_nodes(self, sig: int) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, sig)

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        self.install_signals()
        try:
            self.control = ControlServer(self.cfg.state_dir / "control.sock", self.selector, self.handlers)
            self._start_metrics_http()
        except (StartupError, OSError) as e:
            reason = str(e) if isinstance(e, StartupError) else f"control socket: {e.strerror}"
            print(f"ftpcluster: {reason}", file=sys.stderr)
            self.report_ready(f"error: {reason}")
            if self.control is not None:
                self.control.close()
            return 1
        self.write_pidfile()
        log.info("supervisor started", pid=self.pid, nodes=self.target,
                 listen=[format_hostport(*s.getsockname()[:2]) for s in self.listeners.values()])  # fmt: skip
        try:
            while True:
                try:
                    self.tick()
                except Exception:  # nothing may end the supervisor (and with it every node)
                    log.exception("supervisor tick failed, going on")
                if self.stopping and not self.nodes:
                    break
                for key, _ in self.selector.select(self._wait_time()):
                    try:
                        key.data()
                    except Exception:
                        log.exception("supervisor event handler failed, going on")
        finally:
            self.shutdown()
        return self.exit_code

    def _wait_time(self) -> float:
        if self.stopping or self.signals:
            return 0.1 if not self.signals else 0
        wait = 1.0
        if self.next_spawn_at > time.monotonic():
            wait = min(wait, self.next_spawn_at - time.monotonic())
        if any(self.table.read(n.slot).state != ACCEPTING for n in self.nodes.values()):
            wait = min(wait, 0.05)  # watch booting nodes closely for readiness
        if self.watchdog:
            wait = min(wait, self.watchdog)
        if self.cfg.memcache.enabled:
            wait = min(wait, self.cfg.memcache.sync_interval)
        now = time.monotonic()
        for server in (self.control, self.metrics_http):
            hint = server.listener.wait_hint(now) if server is not None else None
            if hint is not None:
                wait = min(wait, hint)  # a listener paused on EMFILE comes back on time
        return max(wait, 0.0)

    def tick(self) -> None:
        while self.signals:
            self.handle_signal(self.signals.pop(0))
        self.reap()
        now = time.monotonic()
        if self.stopping:
            self.enforce_deadlines(now)
        else:
            self.kill_stale(now)
            self.converge(now)
            self.check_ready()
        if self.control is not None:
            self.control.expire(now)
        if self.metrics_http is not None:
            self.metrics_http.expire(now)
        if self.bans is not None:
            try:
                self.bans.tick(now)
            except Exception:  # the cluster side must never take the supervisor down
                log.exception("ban maintenance failed")
        if self.cluster is not None:
            self.cluster.publish_metrics(self.metrics_writer)
        if self.watchdog and now - self.last_watchdog >= self.watchdog:
            systemd.notify("WATCHDOG=1")
            self.last_watchdog = now

    def reap(self) -> None:
        for _ in range(1024):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            node = self.nodes.pop(pid, None)
            if node is None:
                continue
            self.table.reset(node.slot, 0, FREE)
            self.presence.clear(node.slot)  # its sessions are gone with it
            with contextlib.suppress(Exception):
                self.metrics.zero_gauges(node.slot)
            code = os.waitstatus_to_exitcode(status)
            expected = node.stop_deadline is not None or self.stopping
            if code == BOOT_ERROR and not expected:
                self.boot_failures += 1
                delay = min(0.1 * 2**self.boot_failures, 5.0)
                self.next_spawn_at = time.monotonic() + delay
                log.error("node failed to boot", node=node.node_id, pid=pid, failures=self.boot_failures, retry_in=delay)
                if self.boot_failures >= MAX_BOOT_FAILURES:
                    self.halt(f"nodes keep failing at boot ({self.boot_failures} times in a row); see the log above")
            elif not expected:
                self.restarts += 1
                self.metrics_writer.inc("ftpcluster_node_restarts_total")
                log.warning("node died, replacing it", node=node.node_id, pid=pid, exit=code)
            else:
                log.info("node ended", node=node.node_id, pid=pid, exit=code)

    def halt(self, reason: str) -> None:
        self.halt_reason = reason
        self.exit_code = 1
        log.error("halting", reason=reason)
        self.report_ready(f"error: {reason}")
        self.begin_stop("fast", FAST_STOP_GRACE)

    def enforce_deadlines(self, now: float) -> None:
        for node in self.nodes.values():
            if node.stop_deadline is not None and now >= node.stop_deadline and not node.killed:
                node.killed = True
                log.warning("node did not stop in time, killing it", node=node.node_id, pid=node.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGKILL)

    def kill_stale(self, now: float) -> None:
        timeout = self.cfg.server.heartbeat_timeout
        for node in list(self.nodes.values()):
            if node.killed:
                continue
            view = self.table.read(node.slot)
            booting = view.state != ACCEPTING and node.stop_deadline is None
            limit = BOOT_TIMEOUT if booting and view.pid == 0 else timeout
            last = view.heartbeat if view.pid else node.started
            if now - last > limit:
                log.error("node heartbeat stale, killing it", node=node.node_id, pid=node.pid, silent_for=round(now - last, 1))
                node.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGKILL)
        self.enforce_deadlines(now)

    def current(self) -> list[NodeHandle]:
        return [n for n in self.nodes.values() if n.generation == self.generation and n.stop_deadline is None]

    def converge(self, now: float) -> None:
        # Retired nodes drain (SIGUSR2): their sessions go on; after graceful_timeout the node
        # stops the rest itself; the kill below is only for a node that hangs.
        drain_deadline = now + 2 * self.cfg.server.graceful_timeout + 5
        for node in list(self.nodes.values()):
            if node.stop_deadline is None and (node.generation != self.generation or node.node_id > self.target):
                log.info("retiring node", node=node.node_id, pid=node.pid, generation=node.generation)
                self._ask_stop(node, signal.SIGUSR2, drain_deadline)
        if now < self.next_spawn_at:
            return
        have = {n.node_id for n in self.current()}
        slices = passive_slices(*self.cfg.passive_range, self.target)
        for node_id in range(1, self.target + 1):
            if node_id not in have:
                self.spawn(node_id, slices[node_id - 1])

    def spawn(self, node_id: int, passive: tuple[int, int]) -> None:
        used = {n.slot for n in self.nodes.values()}
        slot = self.table.claim(used)
        close = [self.wake_r, self.wake_w, self.alive_w]
        if self.control is not None:
            close.append(self.control.sock.fileno())
        if self.ready_fd is not None:
            close.append(self.ready_fd)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = spawn(node_id, slot, self.cfg, self.listeners, self.table, passive, self.alive_r, close, self.node_hooks)
        self.nodes[pid] = NodeHandle(node_id, pid, slot, self.generation, passive)
        log.debug("node started", node=node_id, pid=pid, slot=slot, passive=f"{passive[0]}-{passive[1]}")

    def check_ready(self) -> None:
        if self.ready_sent:
            return
        cur = self.current()
        if len(cur) < self.target or any(self.table.read(n.slot).state != ACCEPTING for n in cur):
            return
        self.ready_sent = True
        self.boot_failures = 0
        systemd.notify(f"READY=1\nSTATUS=serving with {self.target} nodes\nMAINPID={self.pid}")
        self.report_ready("ok")
        for p in self.reload_waiters:
            p.answer({"ok": True, "generation": self.generation})
        self.reload_waiters.clear()
        log.info("all nodes accepting", nodes=self.target, generation=self.generation)

    def report_ready(self, message: str) -> None:
        if self.ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, message.encode()[:4000] + b"\n")
            os.close(self.ready_fd)
        self.ready_fd = None

    # ------------------------------------------------------------ status and files
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        nodes = []
        for n in sorted(self.nodes.values(), key=lambda n: (n.generation, n.node_id)):
            v = self.table.read(n.slot)
            nodes.append({
                "id": n.node_id, "pid": n.pid, "sessions": v.sessions, "sessions_total": v.sessions_total,
                "rejected": v.rejected, "state": "draining" if n.stop_deadline else STATE_NAMES.get(v.state, "?"),
                "uptime": round(now - n.started, 1), "passive": f"{n.passive[0]}-{n.passive[1]}",
                "generation": n.generation, "slot": n.slot,
            })  # fmt: skip
        status: dict[str, Any] = {
            "supervisor_pid": self.pid,
            "uptime": round(now - self.started, 1),
            "started_at": self.started_wall,
            "generation": self.generation,
            "target_nodes": self.target,
            "restarts": self.restarts,
            "stopping": self.stopping,
            "nodes": nodes,
            "listen": [format_hostport(*self.listeners["control"].getsockname()[:2])],
            "implicit_tls_listen": [format_hostport(*s.getsockname()[:2]) for k, s in self.listeners.items() if k == "implicit_tls"],
            "passive_ports": self.cfg.server.passive_ports,
            "tls": self.shared.get("tls_mode", {}),
            "memcache": {"enabled": self.cfg.memcache.enabled,
                         "servers": self.cluster.status() if self.cluster is not None else []},
            "totals": self.headline(),
        }
        for extra in self.extra_status:
            with contextlib.suppress(Exception):
                status.update(extra())
        return status

    def pidfile(self) -> str:
        return str(self.cfg.state_dir / "ftpcluster.pid")

    def write_pidfile(self) -> None:
        tmp = self.pidfile() + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.pid}\n")
        os.replace(tmp, self.pidfile())

    def shutdown(self) -> None:
        for p in self.stop_waiters:
            p.answer({"ok": self.exit_code == 0, "error": self.halt_reason} if self.halt_reason else {"ok": True})
        for p in self.reload_waiters:
            p.answer({"ok": False, "error": "stopping"})
        if self.control is not None:
            self.control.close()
        if self.metrics_http is not None:
            self.metrics_http.close()
        if self.bans is not None:
            self.bans.close()
        if self.cluster is not None:
            self.cluster.stop(wait=1.0)
        if self.registry is not None:
            self.registry.close()
        with contextlib.suppress(FileNotFoundError):
            if open(self.pidfile()).read().strip() == str(self.pid):
                os.unlink(self.pidfile())
        if self.exit_code and self.ready_fd is not None:
            self.report_ready(f"error: {self.halt_reason}")
        log.info("supervisor stopped", exit=self.exit_code)


def default_node_hooks() -> list[Callable[[Any], None]]:
    """What every node attaches at start: logs, xferlog, metrics, bans, PROXY."""
    from ..worker.ban_hook import install_bans
    from ..worker.limits_hook import install_limits
    from ..worker.observe import attach_observability
    from ..worker.proxy_accept import install_proxy
    from ..worker.transfer_limits import install_transfer_limits

    return [attach_observability, install_bans, install_limits, install_transfer_limits, install_proxy]


def _wait_ready(fd: int, timeout: float) -> tuple[bool, str]:
    """--daemon parent: wait for the detached supervisor to say "ok" or why it failed."""
    deadline = time.monotonic() + timeout
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    while b"\n" not in buf and time.monotonic() < deadline:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    text = buf.decode(errors="replace").strip()
    if text == "ok":
        return True, ""
    if text.startswith("error: "):
        return False, text[7:]
    return False, text or "the supervisor exited before every node accepted"


def _daemonize() -> tuple[int | None, int]:
    """Fork once, detach, redirect stdio. Returns (parent's read fd, 0) in the parent and
    (None, write fd) in the daemon."""
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        return r, -1
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return None, w


def start(cfg: Config, daemon: bool = False) -> int:
    from ..bootstrap import prepare
    from ..logs import configure
    from .listeners import BindError, bind_all
    from .privileges import PrivilegeError, drop_privileges

    from .preload import preload

    configure(cfg.log, cfg.base_dir, role="supervisor")
    prepare(cfg)
    preload()
    try:
        check(cfg)
        listeners = bind_all(cfg)
        if drop_privileges(cfg):
            check(cfg)  # again as the service account: the nodes read these files as it
    except (StartupError, BindError, PrivilegeError) as e:
        print(f"ftpcluster: {e}", file=sys.stderr)
        return 1
    ready_fd = None
    if daemon:
        parent_r, ready_fd = _daemonize()
        if parent_r is not None:
            ok, why = _wait_ready(parent_r, BOOT_TIMEOUT + 30)
            if not ok:
                print(f"ftpcluster: start failed: {why}", file=sys.stderr)
                return 1
            return 0
        configure(cfg.log, cfg.base_dir, role="supervisor")  # stderr is /dev/null now
    return Arbiter(cfg, listeners, ready_fd).run()
