"""How many descriptors a session needs, for the limits both the supervisor (the
soft RLIMIT_NOFILE it raises) and a node (the sessions it admits) derive from it."""

from __future__ import annotations

import resource

# Control connection, passive listener, data connection. The one transient extra, the
# duplicate descriptor AUTH TLS peeks the ClientHello through (tls_prefetch.peek_ids),
# then watches its handshake through (quickack.ack_arrivals), one after the other,
# fits in the three: AUTH comes before login, so no data connection exists then (a
# passive listener kept by REIN after a transfer at most). An implicit-TLS handshake
# holds two (connection and watch).
PER_SESSION = 3
RESERVE = 64  # log files, shared memory, memcached, pipes, and an accept to refuse with


def soft_limit() -> int | None:
    """The soft RLIMIT_NOFILE, None when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def needed(sessions: int) -> int:
    """Descriptors for `sessions` sessions and the process around them."""
    return sessions * PER_SESSION + RESERVE


def sessions_within(limit: int | None) -> int | None:
    """How many sessions fit under `limit` descriptors (None: no bound)."""
    return None if limit is None else max(1, (limit - RESERVE) // PER_SESSION)
