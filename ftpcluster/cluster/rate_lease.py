"""A user's transfer rate, shared by every node of every host through memcached.

Time is cut into slots of `[limits] rate_slot` (100 ms) on the wall clock; each
slot of each (direction, user) has a budget of rate x slot bytes. A node that
needs bytes leases a piece of the current slot's budget with one `incr` on
`rate:<dir>:<user>:<slot>`: the counter says how much the cluster has taken,
so the node gets min(asked, budget - taken before it). An exhausted slot means
waiting for the next one. Over any span the cluster moves at most
budget x (slots touched), so a transfer of E seconds is at most rate x (E + slot).
Hosts' clocks must agree to a small part of a slot (NTP does, to a millisecond).

memcached down (or every server ejected): each host takes its share of the
budget, rate / hosts (hosts as last seen in memcached or `[limits]
fallback_hosts`), its nodes sharing it through cluster/host_lease.py. Blocking; runs on a node's memcached thread.

memcached's incr cannot carry a MAC, so a slot's key name is a keyed hash of
direction, user and slot under the cluster key (RecordMac.counter_name), a
new name every slot: nobody without the key can find, inflate (starving a
user) or reset (freeing one) the counter of a given user."""

from __future__ import annotations

import time

from typing import Any

from .host_registry import read_hosts
from .memcache_ring import Ring

KEY_TTL = 5  # seconds a slot's counter outlives it


class RateLeaser:
    def __init__(self, ring: Ring | None, mac: Any = None) -> None:
        self.ring = ring
        self.mac = mac  # record_mac.RecordMac; None without a cluster key (plain names)
        self.hosts = 1  # as last seen in memcached
        self._hosts_read = 0.0

    def lease(self, name: str, slot: int, budget: int, want: int) -> int | None:
        """Bytes granted out of `budget` for this slot, or None when memcached cannot answer."""
        if self.ring is None:
            return None
        text = f"{name}|{slot}"
        taken = self.ring.incr("rate:" + (self.mac.counter_name(text) if self.mac is not None else text), want, ttl=KEY_TTL)
        if taken is None:
            return None
        return max(0, min(want, budget - (taken - want)))

    def refresh_hosts(self, every: float = 2.0) -> int:
        """How many hosts share the cluster (for the fallback share), re-read every `every` s."""
        now = time.monotonic()
        if self.ring is not None and self.mac is not None and now - self._hosts_read >= every:
            self._hosts_read = now
            try:
                n = len(read_hosts(self.ring, self.mac))
            except Exception:
                n = 0
            if n:
                self.hosts = n
        return self.hosts
