"""ACK now, where a client with Nagle's algorithm on (ftplib, lftp, most GUI clients)
would otherwise sit out our delayed ACK.

The pattern: the client's two consecutive writes; Nagle holds the second until the
first is ACKed, and we, having just answered (so Linux is in delayed-ACK "pingpong"
mode) or having nothing to say, delay that ACK (Linux: ~40 ms). Two places:

- after a handshake: the client's last flight, then its next write (USER, or the
  first data bytes of a STOR). It hit every resumed explicit login (TLS 1.2; TLS 1.3
  resumed from a ticket, where no new ticket is sent to carry the ACK) and every
  PROT P upload. Where we answer (a reply, the banner after an implicit handshake,
  RETR data) the answer carries the ACK.
- inside a TLS 1.3 handshake: GnuTLS (lftp) writes its ChangeCipherSpec and its
  Finished apart, right after our flight. It hit every full or resumed TLS 1.3
  handshake of such a client: login (explicit and implicit) and each PROT P data
  connection (lftp mirror: 61 ms per small file).

Setting TCP_QUICKACK sends a pending ACK at once and leaves "pingpong" (interactive)
mode, so the next small segments are ACKed as they are read; Linux goes back to
delaying once we answer again (the flag is not sticky), so it is set at the moment
it is needed, not once per socket: during a data connection's handshake (our own
loop) before each wait for the client's bytes and when it completes; during a control
connection's handshake (run inside the event loop's TLS layer) whenever the client's
bytes arrive, seen on a duplicate descriptor, which ACKs the client's last flight as
it arrives too. Cost: during a data connection's handshake, one setsockopt per wait
(0-2: an OpenSSL client's Finished is often there already) and one after it; during a
control connection's (once per login), one per arrival (3-4) and 8 calls for the loop
to watch the duplicate (dup, two FIONBIO, epoll add and removes, close), about 4% of
a resumed FTPS login's CPU. Measured against the alternatives: setting it before every read wait of a
data connection (not only in the handshake) removed the upload stall too, at more
system calls; making a TLS 1.3 ticket
carry the ACK costs a ticket and cannot help TLS 1.2, whose client speaks last; an
SNI callback (OpenSSL calls it just before our flight) finding the socket through a
context variable fixed implicit logins but cannot reach AUTH TLS ones (uvloop runs
every connection of create_server in one shared context). Not tried: a periodic timer
during the handshake, which would leave up to a period of the stall on a LAN and cost
calls in proportion to the round trip."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
MAX_ARRIVALS = 8  # a handshake sees 2-4 (ClientHello, CCS, Finished); beyond: a reader not read


def ack_now(sock: Any) -> None:
    """On a socket (or an asyncio/uvloop transport's socket wrapper); no-op elsewhere."""
    if TCP_QUICKACK is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except (OSError, ValueError, AttributeError):
        pass


class ack_arrivals:  # noqa: N801  (used as a context manager, like the function it was)
    """While the loop's TLS layer runs a handshake on `sock` (start_tls, an ssl=
    transport): ACK whenever the client's bytes arrive. A loop refuses a reader on a
    transport's descriptor, so a plain socket on a duplicate is watched (and set: a
    uvloop transport's socket asks getsockname before each setsockopt; the duplicate
    is made with family and type given, so nothing is asked of the kernel). Readiness
    is level-triggered and the TLS layer reads what arrived in the same loop turn, so
    it fires about once per arrival (at most MAX_ARRIVALS times: never a busy loop).
    The client's last flight is ACKed as it arrives too, so its first command after
    the handshake does not wait either."""

    __slots__ = ("loop", "sock", "watch", "left")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: Any) -> None:
        self.loop, self.sock = loop, sock
        self.watch: socket.socket | None = None
        self.left = MAX_ARRIVALS

    def __enter__(self) -> ack_arrivals:
        if TCP_QUICKACK is None or self.sock is None:
            return self
        try:
            fd = os.dup(self.sock.fileno())
        except (OSError, ValueError, AttributeError):
            return self
        self.watch = socket.socket(self.sock.family, self.sock.type, 0, fd)
        self.loop.add_reader(self.watch, self._arrived)
        return self

    def _arrived(self) -> None:
        ack_now(self.watch)
        self.left -= 1
        if self.left == 0:
            self.loop.remove_reader(self.watch)  # type: ignore[arg-type]

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        watch = self.watch
        if watch is None:
            return
        self.loop.remove_reader(watch)
        watch.close()
