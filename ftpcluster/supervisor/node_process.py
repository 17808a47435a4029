"""Forking one worker node and what the child does before it serves.

The child resets the supervisor's signal handlers, asks the kernel for a
signal when the supervisor dies (and double-checks it is not already gone),
keeps the read end of the supervisor's liveness pipe, and runs the node. A
node that fails before it ever accepted exits with BOOT_ERROR so the arbiter
can tell a broken config from a crash."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..config import Config
from ..logs import configure
from ..logs import flush as flush_logs
from ..worker.node import NodeContext, run_node, set_parent_death_signal
from .node_table import ACCEPTING, BOOTING, STOPPING, NodeTable

BOOT_ERROR = 3
ROOM_FRESH = 3.0  # seconds: a node whose heartbeat is older does not count as having room (full_node.py)
RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                 signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE)  # fmt: skip


@dataclass
class NodeHandle:
    """The supervisor's view of one node process."""

    node_id: int
    pid: int
    slot: int
    generation: int
    passive: tuple[int, int]
    started: float = field(default_factory=time.monotonic)
    stop_deadline: float | None = None  # set once asked to stop
    hurried: bool = False  # told to stop at once (SIGQUIT): SIGKILL is next
    killed: bool = False

    def send(self, sig: int) -> None:
        """Signal the node; one that is already gone is no error (it is reaped soon)."""
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def ask_stop(self, sig: int, deadline: float) -> None:
        """Ask it to stop by `deadline` (an earlier deadline wins); after it, SIGQUIT
        (the node aborts what runs, as a fast stop), then SIGKILL."""
        if self.stop_deadline is None or deadline < self.stop_deadline:
            self.stop_deadline = deadline
        self.hurried = self.hurried or sig == signal.SIGQUIT
        self.send(sig)

    def kill(self) -> None:
        self.killed = True
        self.send(signal.SIGKILL)


def spawn(
    node_id: int,
    slot: int,
    cfg: Config,
    listeners: dict[str, socket.socket],
    table: NodeTable,
    passive: tuple[int, int],
    parent_fd: int,
    close_fds: list[int],
) -> int:
    """Fork a node; returns the child's pid in the parent and never returns in the child."""
    supervisor_pid = os.getpid()
    table.reset(slot, 0, BOOTING)
    pid = os.fork()
    if pid:
        return pid
    code = BOOT_ERROR
    try:
        code = _child(node_id, slot, cfg, listeners, table, passive, parent_fd, close_fds, supervisor_pid)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:
        traceback.print_exc()
        code = 1 if table.read(slot).state in (ACCEPTING, STOPPING) else BOOT_ERROR
        with contextlib.suppress(Exception):  # into the log too: under --daemon stderr is /dev/null
            structlog.get_logger("ftpcluster.node").error(
                "node failed to boot" if code == BOOT_ERROR else "node crashed",
                node=node_id, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())  # fmt: skip
    finally:
        try:
            flush_logs()  # lines of the node's last loop iteration (batched, see logs.py)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    raise AssertionError("unreachable")


def _child(
    node_id: int,
    slot: int,
    cfg: Config,
    listeners: dict[str, socket.socket],
    table: NodeTable,
    passive: tuple[int, int],
    parent_fd: int,
    close_fds: list[int],
    supervisor_pid: int,
) -> int:
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a terminal hang-up is the supervisor's business
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a client gone mid-write is an EPIPE, not a dead node
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    configure(cfg.log, cfg.base_dir, role="node", node=node_id)

    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != supervisor_pid:  # died between fork and prctl
        return 1
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if os.environ.get("FTPCLUSTER_FAULT") == "node-boot":  # fault injection for the back-off test
        raise RuntimeError("injected boot failure (FTPCLUSTER_FAULT=node-boot)")
    pid = os.getpid()
    started = time.monotonic()

    def heartbeat(stats: dict[str, Any]) -> None:
        state = STOPPING if stats.get("stopping") else ACCEPTING
        table.beat(slot, pid, state, started, stats.get("sessions", 0), stats.get("sessions_total", 0),
                   stats.get("rejected_total", 0), stats.get("in_use", 0))  # fmt: skip

    def room_elsewhere(cap: int) -> bool:
        """Another node of this host accepting, alive (heartbeat fresh), below `cap`."""
        now = time.monotonic()
        for other in range(table.slots):
            if other != slot:
                v = table.read(other)
                if v.pid and v.state == ACCEPTING and now - v.heartbeat < ROOM_FRESH and v.in_use < cap:
                    return True
        return False

    ctx = NodeContext(
        node_id=node_id,
        config=cfg,
        control_sock=listeners["control"],
        implicit_tls_sock=listeners.get("implicit_tls"),
        passive_range=passive,
        heartbeat=heartbeat,
        parent_fd=parent_fd,
        slot=slot,
        room_elsewhere=room_elsewhere,
    )
    return run_node(ctx)

