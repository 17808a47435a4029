"""ACK now, where a client with Nagle's algorithm on (ftplib, most GUI clients) would
otherwise sit out our delayed ACK.

The pattern: the client's last handshake flight and its next write (USER, or the
first data bytes of a STOR) go out as two writes; Nagle holds the second until the
first is ACKed, and we, having nothing to say, delay that ACK (Linux: ~40 ms). It hit
every resumed explicit login (TLS 1.2; TLS 1.3 resumed from a ticket, where no new
ticket is sent to carry the ACK) and every PROT P upload. Where we answer (a reply,
the banner after an implicit handshake, RETR data) the answer carries the ACK.

Setting TCP_QUICKACK sends a pending ACK at once and leaves "pingpong" (interactive)
mode, so the next small segments are ACKed as they are read; Linux goes back to
delaying once we answer again (the flag is not sticky), so it is set at the moment
a handshake completes, not once per socket. Cost: one setsockopt per handshake.
Measured against the alternatives: setting it before every read wait of a data
connection removed the stall too, at more system calls; making a TLS 1.3 ticket
carry the ACK costs a ticket and cannot help TLS 1.2, whose client speaks last."""

from __future__ import annotations

import socket
from typing import Any

TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def ack_now(sock: Any) -> None:
    """On a socket (or an asyncio/uvloop transport's socket wrapper); no-op elsewhere."""
    if TCP_QUICKACK is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except (OSError, ValueError, AttributeError):
        pass
