"""The supervisor's loop, after gunicorn's arbiter: it only manages processes.
Signal handlers queue the signal and wake the loop (signals.py); each tick runs
queued signals (SIGNAL_HANDLERS) and control requests, reaps children, kills nodes
whose shared-memory heartbeat is stale, then converges: as many nodes of the
current generation as the target, none of older ones (they drain). Reload = bump
the generation; the listeners are bound once and never close, so a connection
arriving during a reload waits in the backlog. Host-wide parts (metrics, shared
memory, bans, memcached): host_services.py; `status`: status.py; start: boot.py."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, Callable

import structlog

from ..config import Config, format_hostport
from ..logs import reopen
from . import systemd
from .control_server import Pending
from .daemon import ReadyReport
from .endpoints import Endpoints
from .host_services import HostServices
from .node_process import BOOT_ERROR, NodeHandle, spawn
from .node_table import ACCEPTING, FREE, NodeTable, passive_slices
from .pidfile import remove_pidfile, write_pidfile
from .preflight import StartupError, reload_config
from .signals import SignalQueue
from .status import build_status

log = structlog.get_logger("ftpcluster.supervisor")

MAX_BOOT_FAILURES = 5
BOOT_TIMEOUT = 30.0
FAST_STOP_GRACE = 5.0
HURRY_GRACE = 3.0  # after a stop deadline: the node's own fast stop, then SIGKILL
MAX_NODES = 64
PIDFILE = "ftpcluster.pid"
SIGNAL_HANDLERS = {
    signal.SIGTERM: "handle_term",
    signal.SIGINT: "handle_quit",
    signal.SIGQUIT: "handle_quit",
    signal.SIGHUP: "handle_hup",
    signal.SIGTTIN: "handle_ttin",
    signal.SIGTTOU: "handle_ttou",
    signal.SIGUSR1: "handle_usr1",
}


class Arbiter:
    def __init__(self, cfg: Config, listeners: dict[str, socket.socket], ready_fd: int | None = None) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.ready = ReadyReport(ready_fd)  # --daemon: the waiting parent reads "ok" or an error
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.target = cfg.server.nodes
        self.generation = 1
        self.nodes: dict[int, NodeHandle] = {}
        self.table = NodeTable()
        self.selector = selectors.DefaultSelector()
        self.signals = SignalQueue()
        self.selector.register(self.signals.fileno(), selectors.EVENT_READ, self.signals.drain_wake)
        # Liveness pipe: nodes keep the read end; EOF there means the supervisor is gone.
        self.alive_r, self.alive_w = os.pipe()
        os.set_inheritable(self.alive_r, True)
        self.stopping: str | None = None  # None | "graceful" | "fast"
        self.stop_waiters: list[Pending] = []
        self.reload_waiters: list[Pending] = []
        self.reload_notes: list[str] = []  # what the last reload could not apply (said by `reload`)
        self.boot_failures = 0
        self.next_spawn_at = 0.0
        self.exit_code = 0
        self.halt_reason = ""
        self.ready_sent = False
        self.restarts = 0
        self.watchdog = systemd.watchdog_interval()
        self.last_watchdog = 0.0
        self.handlers: dict[str, Callable[[dict[str, Any], Pending], dict[str, Any] | None]] = {
            "status": lambda req, p: {"ok": True, "status": self.status()},
            "stop": self._cmd_stop,
            "reload": self._cmd_reload,
            "ping": lambda req, p: {"ok": True},
        }
        self.endpoints = Endpoints()  # the control socket and the metrics endpoint
        self.services = HostServices(cfg, self.handlers)  # adds the ban requests to handlers

    # ------------------------------------------------------------ signals
    def handle_signal(self, sig: int) -> None:
        name = SIGNAL_HANDLERS.get(sig)
        if name is not None:
            getattr(self, name)()

    def handle_term(self) -> None:
        self.begin_stop("graceful", self.cfg.server.graceful_timeout)

    def handle_quit(self) -> None:
        self.begin_stop("fast", FAST_STOP_GRACE)

    def handle_hup(self) -> None:
        self.reload()

    def handle_ttin(self) -> None:
        self.target = min(MAX_NODES, self.target + 1)
        log.info("node count raised", target=self.target)

    def handle_ttou(self) -> None:
        self.target = max(1, self.target - 1)
        log.info("node count lowered", target=self.target)

    def handle_usr1(self) -> None:
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
            node.ask_stop(sig, deadline)

    def reload(self) -> str | None:
        """Re-read the config, users and certificates; new nodes, old ones drain. Returns an error text."""
        if self.stopping:
            return "stopping"
        self.reload_notes = []
        try:
            new = reload_config(self.cfg, self.reload_notes)
        except StartupError as e:
            log.error("reload refused, keeping the running config", error=str(e))
            return f"reload refused: {e}"
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        error = self.services.reload(new)  # every new piece first; a failure keeps the running ones
        if error:
            systemd.notify("READY=1")
            return error
        self.cfg = new
        self.generation += 1
        self.ready_sent = False
        self.boot_failures = 0
        log.info("reloading", generation=self.generation)
        return None

    def signal_nodes(self, sig: int) -> None:
        for node in self.nodes.values():
            node.send(sig)

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        self.signals.install()
        try:
            self.endpoints.open(self.cfg, self.selector, self.handlers, lambda: self.services.metrics.render())
        except (StartupError, OSError) as e:
            reason = str(e) if isinstance(e, StartupError) else f"control socket: {e.strerror}"
            print(f"ftpcluster: {reason}", file=sys.stderr)
            self.ready.send(f"error: {reason}")
            return 1
        write_pidfile(self.cfg.state_dir / PIDFILE, self.pid)
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
        if self.signals or self.stopping:
            return 0.0 if self.signals else 0.1
        now = time.monotonic()
        waits = [1.0, self.watchdog or 1.0, self.cfg.memcache.sync_interval if self.cfg.memcache.enabled else 1.0]
        if self.next_spawn_at > now:
            waits.append(self.next_spawn_at - now)
        if any(self.table.read(n.slot).state != ACCEPTING for n in self.nodes.values()):
            waits.append(0.05)  # watch booting nodes closely for readiness
        hint = self.endpoints.wait_hint(now)
        if hint is not None:
            waits.append(hint)  # a listener paused on EMFILE comes back on time
        return max(min(waits), 0.0)

    def tick(self) -> None:
        while (sig := self.signals.pop()) is not None:
            self.handle_signal(sig)
        self.reap()
        now = time.monotonic()
        if self.stopping:
            self.enforce_deadlines(now)
        else:
            self.kill_stale(now)
            self.converge(now)
            self.check_ready()
        self.endpoints.expire(now)
        self.services.tick(now)
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
            self.services.node_gone(node.slot)  # its sessions and gauges are gone with it
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
                self.services.metrics_writer.inc("ftpcluster_node_restarts_total")
                log.warning("node died, replacing it", node=node.node_id, pid=pid, exit=code)
            else:
                log.info("node ended", node=node.node_id, pid=pid, exit=code)

    def halt(self, reason: str) -> None:
        self.halt_reason = reason
        self.exit_code = 1
        log.error("halting", reason=reason)
        self.ready.send(f"error: {reason}")
        self.begin_stop("fast", FAST_STOP_GRACE)

    def enforce_deadlines(self, now: float) -> None:
        """A node past its stop deadline is told to stop at once (SIGQUIT: its sessions
        get 421, transfers end as aborts: 426, xferlog `i`, no partial upload left);
        one that still runs HURRY_GRACE later is killed."""
        for node in self.nodes.values():
            if node.stop_deadline is None or now < node.stop_deadline or node.killed:
                continue
            if not node.hurried:
                log.warning("node did not stop in time, stopping its sessions now", node=node.node_id, pid=node.pid)
                node.ask_stop(signal.SIGQUIT, now + HURRY_GRACE)
                node.stop_deadline = now + HURRY_GRACE
            else:
                log.warning("node did not stop in time, killing it", node=node.node_id, pid=node.pid)
                node.kill()

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
                node.kill()
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
                node.ask_stop(signal.SIGUSR2, drain_deadline)
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
        close = [*self.signals.fds(), self.alive_w, *self.endpoints.fds()]
        if self.ready.fd is not None:
            close.append(self.ready.fd)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = spawn(node_id, slot, self.cfg, self.listeners, self.table, passive, self.alive_r, close)
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
        self.ready.send("ok")
        for p in self.reload_waiters:
            p.answer({"ok": True, "generation": self.generation, "notes": self.reload_notes})
        self.reload_waiters.clear()
        log.info("all nodes accepting", nodes=self.target, generation=self.generation)

    # ------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        return build_status(self)

    def shutdown(self) -> None:
        for p in self.stop_waiters:
            p.answer({"ok": self.exit_code == 0, "error": self.halt_reason} if self.halt_reason else {"ok": True})
        for p in self.reload_waiters:
            p.answer({"ok": False, "error": "stopping"})
        self.endpoints.close()
        self.services.close()
        remove_pidfile(self.cfg.state_dir / PIDFILE, self.pid)
        if self.exit_code:
            self.ready.send(f"error: {self.halt_reason}")
        log.info("supervisor stopped", exit=self.exit_code)
