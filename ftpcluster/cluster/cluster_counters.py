"""Ban-rule event counters summed over every host (memcached add/incr with TTL).

ProFTPD counts per host only, so an attacker spread over K hosts gets K times
the allowance (proftpd#1355). Here each node also counts into memcached: a key
per (counter, time bucket) with 4 buckets per window and TTL = window, and the
sum over the buckets inside the sliding window (the oldest one weighted by how
much of it is still inside) is compared with the rule's threshold.

memcached's incr cannot carry a MAC, so the key names are a keyed hash of the
counter (event, target, client) and window under a key derived from the
cluster key (RecordMac.counter_name): nobody without that key can name, read
or inflate the counter of a given address. Whatever the values say, a total
only ever fires a rule for the address (or user) whose event was just counted
here, the one its name was derived from (ban_hook._counted).

Runs on a node's single memcached thread, never on the event loop."""

from __future__ import annotations

import time
from typing import Callable

from .memcache_ring import Ring

BUCKETS = 4


class ClusterCounters:
    def __init__(self, ring: Ring, keyed_hash: Callable[[str], str]) -> None:
        self.ring = ring
        self.keyed_hash = keyed_hash  # RecordMac.counter_name

    def _name(self, ckey: str, window: float, bucket: int) -> str:
        return f"cnt:{self.keyed_hash(f'{ckey}|{window}')}:{bucket}"

    def add(self, ckey: str, window: float, now: float | None = None) -> float | None:
        """Count one event cluster-wide; the sliding-window total, or None when
        memcached cannot say (then the host count alone decides)."""
        now = time.time() if now is None else now
        width = max(window / BUCKETS, 0.001)
        b = int(now // width)
        ttl = int(window + width) + 1
        current = self.ring.incr(self._name(ckey, window, b), 1, ttl=ttl)
        if current is None:
            return None
        older = [self._name(ckey, window, b - i) for i in range(1, BUCKETS + 1)]
        got = self.ring.get_many(older)
        total = float(current)
        for i, name in enumerate(older, 1):
            try:
                n = int(got.get(name) or 0)
            except ValueError:
                n = 0
            if i == BUCKETS:  # partly outside the window
                n = n * (1.0 - (now - b * width) / width)
            total += max(0, n)
        return total
