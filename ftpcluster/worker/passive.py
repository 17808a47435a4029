"""Passive ports, only from this node's slice of the configured range.

Never falls back to a port outside the range (pyftpdlib does): when every port
is busy the caller answers 425. A rotating cursor spreads use over the slice so
a port just closed (TIME_WAIT on the client side) is not handed out again at once."""

from __future__ import annotations

import errno
import socket


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


# Connections a passive listener queues before one is accepted: the owner's, and a few
# strangers' until the node's sweep starts closing them (DataChannel.watch_strangers).
PASSIVE_BACKLOG = 16


class NoPassivePort(Exception):
    """Every port of the range is in use."""


class PassivePorts:
    def __init__(self, low: int, high: int) -> None:
        if not 0 < low <= high <= 65535:
            raise ValueError(f"bad passive range {low}-{high}")
        self.low, self.high = low, high
        self._next = low
        self.last_port = 0  # the port open() bound last

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def open(self, host: str, family: int) -> socket.socket:
        """A listening, non-blocking socket on a free port of the range."""
        for _ in range(self.size):
            port = self._next
            self._next = self.low if port >= self.high else port + 1
            # Non-blocking from the start: no ioctl after the fact
            sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(PASSIVE_BACKLOG)
                if not _NONBLOCK:
                    sock.setblocking(False)
                self.last_port = port
                return sock
            except OSError as e:
                sock.close()
                if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
        raise NoPassivePort(f"all {self.size} passive ports ({self.low}-{self.high}) are in use")
