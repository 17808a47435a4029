"""A node at its session cap leaves new connections to sibling nodes with room.

The nodes of a host share one listening socket, so one kernel accept queue. A
node whose sessions had reached `max_sessions_per_node` (or the cap the
descriptor limit sets) still took its turn at that queue and answered 421,
while a sibling had room. Now such a node stops listening for as long as a
sibling reports room in the host's node table (accepting, heartbeat fresh, fewer
sessions than the cap), and the kernel hands the queue to the siblings (nginx's
`ngx_accept_disabled` does the same). When no sibling has room it listens again
and answers 421 itself, as before: a client is told at once rather than left
waiting in the queue. The table is up to a heartbeat old, so a sibling that has
just filled up can look free: each node looks again every second and listens
again if not, so at worst a connection waits that long before it is served or
told 421."""

from __future__ import annotations

from typing import Callable

import structlog

log = structlog.get_logger("ftpcluster.worker")

RoomElsewhere = Callable[[int], bool]  # (cap) -> a sibling node has fewer sessions than cap


class FullNode:
    """When to stop and start listening; the node does the listening (`pause`, `resume`)."""

    def __init__(self, room_elsewhere: RoomElsewhere | None, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:  # fmt: skip
        self.room_elsewhere = room_elsewhere
        self._pause, self._resume = pause, resume
        self.paused = False

    def filled(self, in_use: int, cap: int) -> None:
        """A session (or a connection still being set up) was added."""
        if not self.paused and self.room_elsewhere is not None and in_use >= cap and self.room_elsewhere(cap):
            self.paused = True
            self._pause()
            log.info("node full: leaving new connections to nodes with room", sessions=in_use, cap=cap)

    def freed(self, in_use: int, cap: int) -> None:
        """A session ended: below the cap, take connections again."""
        if self.paused and in_use < cap:
            self._listen_again()

    def tick(self, in_use: int, cap: int) -> None:
        """Every second while paused: listen again once no sibling has room."""
        if self.paused and (in_use < cap or self.room_elsewhere is None or not self.room_elsewhere(cap)):
            self._listen_again()

    def _listen_again(self) -> None:
        self.paused = False
        self._resume()
