"""The descriptor limit the nodes inherit, raised before they fork.

A session holds up to three descriptors (control, passive listener, data), so a
node at `max_sessions_per_node` needs about three times that. A shell's soft
limit is often 1024 (systemd's default too, outside our unit's LimitNOFILE):
the soft limit is raised to the hard one, as nginx's worker_rlimit_nofile and
most servers do, and a limit still too low for the configured sessions is
logged once at start, with the fix (each node then admits only what fits:
NodeServer.session_cap)."""

from __future__ import annotations

import resource

import structlog

from ..config import Config
from ..descriptors import needed, sessions_within

log = structlog.get_logger("ftpcluster.supervisor")


def raise_fd_limit(cfg: Config) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    want = needed(cfg.server.max_sessions_per_node)
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning("descriptor limit below what max_sessions_per_node needs", limit=soft, needed=want,
                    sessions_per_node=sessions_within(soft),  # what each node admits then (421 beyond)
                    fix="raise LimitNOFILE (systemd) or ulimit -n, or lower [server] max_sessions_per_node")  # fmt: skip
    return soft
