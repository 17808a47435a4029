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
it is needed, not once per socket: when a handshake completes; during a data
connection's handshake (our own loop) before each wait for the client's bytes; during
a control connection's handshake (run inside the event loop's TLS layer) whenever the
client's bytes arrive, seen on a duplicate descriptor. Cost: one setsockopt after a
handshake; during a data connection's, one per wait (0-2: an OpenSSL client's Finished
is often there already); during a control connection's (once per login), one per
arrival (3-4) and about 12 calls for the loop to watch the duplicate (as the
ClientHello prefetch pays): some 15 us, next to milliseconds of crypto and password
hashing. Measured against the alternatives: setting it before every read wait of a
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
import contextlib
import socket
from collections.abc import Iterator
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


@contextlib.contextmanager
def ack_arrivals(loop: asyncio.AbstractEventLoop, sock: Any) -> Iterator[None]:
    """While the loop's TLS layer runs a handshake on `sock` (start_tls, an ssl=
    transport): ACK whenever the client's bytes arrive. A loop refuses a reader on a
    transport's descriptor, so a plain socket on a duplicate is watched (and set: a
    uvloop transport's socket asks getsockname before each setsockopt). Readiness is
    level-triggered and the TLS layer reads what arrived in the same loop turn, so it
    fires about once per arrival (at most MAX_ARRIVALS times: never a busy loop)."""
    if TCP_QUICKACK is None or sock is None:
        yield
        return
    try:
        watch = sock.dup()
    except (OSError, ValueError, AttributeError):
        yield
        return
    left = MAX_ARRIVALS

    def arrived() -> None:
        nonlocal left
        ack_now(watch)
        left -= 1
        if left == 0:
            loop.remove_reader(watch)

    loop.add_reader(watch, arrived)
    try:
        yield
    finally:
        loop.remove_reader(watch)
        watch.close()
