"""A transfer on the event loop takes turns with the node's other sessions.

A read that finds data waiting returns without suspending, so a fast client of
a PROT P upload kept the loop for the whole file (other sessions of the node
stalled 150-560 ms). Here a TLS data stream receives 8 MB from a client thread
that keeps its socket full (the consumer is slower than the sender: a slow
disk), and a ticker task counts the turns it gets meanwhile. The
count is a lower bound the stream guarantees (a turn per FAIR_SHARE bytes), so
the check does not depend on timing."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

from ftpcluster.certs import generate_self_signed
from ftpcluster.worker.datastream import FAIR_SHARE
from ftpcluster.worker.datatls import TLSStream

TOTAL = 8 << 20


def _server_context(tmp_path) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    cert, key = generate_self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _client(sock: socket.socket) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(sock) as tls:
        chunk = b"u" * (1 << 20)
        for _ in range(TOTAL // len(chunk)):
            tls.sendall(chunk)
        tls.unwrap()


def test_tls_upload_yields_to_other_sessions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server_ctx = _server_context(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=30)
    sock, _ = listener.accept()
    listener.close()
    sender = threading.Thread(target=_client, args=(client,), daemon=True)
    sender.start()

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        stream = TLSStream(server_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), loop)
        await asyncio.wait_for(stream.handshake(), 30)
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(ticker())
        buf = memoryview(bytearray(64 << 10))
        got = 0
        async with asyncio.timeout(60):  # no wait_for per read: its task would yield each time
            for _ in range(TOTAL):  # bounded: at least one byte a pass until the end
                n = await stream.recv_into(buf)
                if n == 0:
                    break
                time.sleep(0.0002)  # a consumer slower than the sender (a slow disk): data always waits
                got += n
        done = True
        await other
        await stream.close()
        return got, ticks

    got, ticks = asyncio.run(main())
    sender.join(30)
    client.close()
    assert got == TOTAL
    assert ticks >= TOTAL // FAIR_SHARE // 2, f"another task ran {ticks} times while {got} bytes arrived"
