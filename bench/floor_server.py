"""A floor for the `sessions` and `ftps_resumed` workloads (peer "floor", not started
by default): the least a login can cost on this machine with uvloop, forked workers
on one shared listener, TCP_NODELAY, one write per reply. It answers USER, PASS and
QUIT (and AUTH TLS, PBSZ and PROT) with fixed replies, checks nothing and logs
nothing, so its server CPU per session is the kernel's, the event loop's and (FTPS)
OpenSSL's share alone; a real server's figure minus this one is what its own code
costs.

FTPS runs the stdlib `ssl` on the loop's start_tls, as ftpcluster does: TLS 1.2 or
newer, one TLS 1.3 ticket per handshake, tickets under OpenSSL's own key (made
before the fork, so every worker resumes every ticket), no session-cache or
ticket-key callbacks, no TCP_QUICKACK watch.

python -m bench.floor_server --port P [--workers N] [--cert C --key K]"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl

import uvloop

REPLIES = {b"USER": b"331 Password required\r\n", b"PASS": b"230 Logged in\r\n",
           b"PBSZ": b"200 PBSZ=0\r\n", b"PROT": b"200 Protection set\r\n"}  # fmt: skip
TLS: ssl.SSLContext | None = None


class Login(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.t.write(b"220 floor ready\r\n")

    def data_received(self, data: bytes) -> None:
        verb = data[:4].upper()
        if verb == b"QUIT":
            self.t.write(b"221 Goodbye\r\n")
            self.t.close()
        elif verb == b"AUTH" and TLS is not None:
            self.t.write(b"234 AUTH TLS ok\r\n")
            self.t.pause_reading()  # the ClientHello is for the TLS layer
            asyncio.get_running_loop().create_task(self._start_tls(TLS))
        else:
            self.t.write(REPLIES.get(verb, b"502 Not implemented\r\n"))

    async def _start_tls(self, ctx: ssl.SSLContext) -> None:
        try:
            self.t = await asyncio.get_running_loop().start_tls(self.t, self, ctx, server_side=True)  # type: ignore[assignment]
        except (OSError, asyncio.TimeoutError):
            self.t.abort()


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.num_tickets = 1
    return ctx


def main() -> None:
    global TLS
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()
    if a.cert and a.key:
        TLS = tls_context(a.cert, a.key)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", a.port))
    sock.listen(1024)
    sock.setblocking(False)
    for _ in range(a.workers - 1):
        if os.fork() == 0:
            break
    loop = uvloop.new_event_loop()
    loop.run_until_complete(loop.create_server(Login, sock=sock, backlog=1024))
    loop.run_forever()


if __name__ == "__main__":
    main()
