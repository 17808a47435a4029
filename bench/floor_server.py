"""A floor for the `sessions` workload (peer "floor", not started by default): the
least a login can cost on this machine with uvloop, forked workers on one shared
listener, TCP_NODELAY, one write per reply. It answers USER, PASS and QUIT with
fixed replies, checks nothing and logs nothing, so its server CPU per session is
the kernel's and the event loop's share alone; a real server's figure minus this
one is what its own code costs.

python -m bench.floor_server --port P [--workers N]"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

import uvloop

REPLIES = {b"USER": b"331 Password required\r\n", b"PASS": b"230 Logged in\r\n"}


class Login(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.t.write(b"220 floor ready\r\n")

    def data_received(self, data: bytes) -> None:
        verb = data[:4].upper()
        if verb == b"QUIT":
            self.t.write(b"221 Goodbye\r\n")
            self.t.close()
        else:
            self.t.write(REPLIES.get(verb, b"502 Not implemented\r\n"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
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
