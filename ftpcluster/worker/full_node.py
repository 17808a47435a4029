"""A node at its session cap leaves new connections to sibling nodes with room.

The nodes of a host share one listening socket, so one kernel accept queue. A
node whose sessions had reached `max_sessions_per_node` (or the cap the
descriptor limit sets) still took its turn at that queue and answered 421,
while a sibling had room. Now such a node stops listening for as long as a
sibling reports room in the host's node table (accepting, heartbeat fresh, in
use below the cap: sessions and connections still being set up, as the cap
counts them), and the kernel hands the queue to the siblings (nginx's
`ngx_accept_disabled` does the same). When no sibling has room it listens again
and answers 421 itself, as before: a client is told at once rather than left
waiting in the queue.

A node writes its row when it fills up and when it has room again, not only
with its heartbeat, so siblings see those two moments at once. A full node that
kept listening (no sibling had room then) looks again every second, and when it
refuses a client for the cap (at most every REFUSED_LOOK seconds)."""

from __future__ import annotations

import time
from typing import Callable

import structlog

log = structlog.get_logger("ftpcluster.worker")

RoomElsewhere = Callable[[int], bool]  # (cap) -> a sibling node has less than cap in use
REFUSED_LOOK = 0.1  # seconds between looks at the node table prompted by 421s


class FullNode:
    """When to stop and start listening; the node listens (`pause`, `resume`) and
    writes its row of the node table (`publish`)."""

    def __init__(self, room_elsewhere: RoomElsewhere | None, pause: Callable[[], None], resume: Callable[[], None],
                 publish: Callable[[], None]) -> None:  # fmt: skip
        self.room_elsewhere = room_elsewhere
        self._pause, self._resume, self._publish = pause, resume, publish
        self.paused = False
        self.full = False  # as last published
        self._next_look = 0.0

    def changed(self, in_use: int, cap: int) -> None:
        """Sessions or connections being set up came or went."""
        full = in_use >= cap
        if full != self.full:
            self.full = full
            self._publish()
        if full:
            self._look(cap)
        elif self.paused:
            self._listen_again()

    def refused(self, cap: int) -> None:
        """A client was told 421 for the cap: maybe a sibling has room by now."""
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + REFUSED_LOOK
            self._look(cap)

    def tick(self, in_use: int, cap: int) -> None:
        """Every second: pause if full and a sibling has room; listen again if paused
        and not full or no sibling has room any more."""
        if not self.paused:
            if in_use >= cap:
                self._look(cap)
        elif in_use < cap or self.room_elsewhere is None or not self.room_elsewhere(cap):
            self._listen_again()

    def listen_failed(self) -> None:
        """The node could not listen again (out of descriptors, say): as if paused, so
        the next tick tries again."""
        self.paused = True

    def _look(self, cap: int) -> None:
        if not self.paused and self.room_elsewhere is not None and self.room_elsewhere(cap):
            self.paused = True
            self._pause()
            log.info("node full: leaving new connections to nodes with room", cap=cap)

    def _listen_again(self) -> None:
        self.paused = False
        self._resume()
