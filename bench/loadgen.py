"""A load generator that can drive any FTP server: many concurrent asyncio clients
speaking raw FTP (no ftplib: the client must not be the bottleneck).

Workloads report operations per second; run in a separate process from the
server so both get a core."""

from __future__ import annotations

import asyncio
import ssl
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    ops: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """Read one (possibly multi-line) FTP reply; returns its first line."""
    first = await reader.readline()
    if not first:
        raise ConnectionError("closed")
    if first[3:4] == b"-":
        code = first[:3] + b" "
        for _ in range(1000):
            line = await reader.readline()
            if not line or line.startswith(code):
                break
    return first


async def _cmd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str) -> bytes:
    writer.write(line.encode() + b"\r\n")
    return await _reply(reader)


async def one_session(host: str, port: int, user: str, password: str, tls: ssl.SSLContext | None = None,
                      implicit: bool = False, session: object = None) -> object:  # fmt: skip
    """connect, (AUTH TLS), USER, PASS, QUIT; returns the TLS session for reuse."""
    reader, writer = await asyncio.open_connection(host, port, ssl=tls if implicit else None)
    try:
        banner = await _reply(reader)
        if not banner.startswith(b"220"):
            raise ConnectionError(banner.decode(errors="replace").strip())
        if tls is not None and not implicit:
            r = await _cmd(reader, writer, "AUTH TLS")
            if not r.startswith(b"234"):
                raise ConnectionError(r.decode(errors="replace").strip())
            await writer.start_tls(tls, server_hostname=None, ssl_handshake_timeout=10)  # type: ignore[call-arg]
        tls_obj = writer.get_extra_info("ssl_object")
        r = await _cmd(reader, writer, f"USER {user}")
        if r.startswith(b"331"):
            r = await _cmd(reader, writer, f"PASS {password}")
        if not r.startswith(b"230"):
            raise ConnectionError(r.decode(errors="replace").strip())
        await _cmd(reader, writer, "QUIT")
        return tls_obj.session if tls_obj is not None else None
    finally:
        writer.close()


async def sessions(host: str, port: int, user: str, password: str, concurrency: int, duration: float,
                   tls: ssl.SSLContext | None = None, implicit: bool = False) -> Result:  # fmt: skip
    res = Result()
    deadline = time.monotonic() + duration

    async def worker() -> None:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(one_session(host, port, user, password, tls, implicit), 10)
                res.ops += 1
                res.latencies.append(time.monotonic() - t0)
            except (OSError, ConnectionError, asyncio.TimeoutError, ssl.SSLError):
                res.errors += 1
                await asyncio.sleep(0.01)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.seconds = time.monotonic() - t0
    return res


def run(coro):  # type: ignore[no-untyped-def]
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("user")
    ap.add_argument("password")
    ap.add_argument("-c", type=int, default=32)
    ap.add_argument("-t", type=float, default=5)
    a = ap.parse_args()
    r = run(sessions(a.host, a.port, a.user, a.password, a.c, a.t))
    print(f"{r.rate:.0f} sessions/s, {r.errors} errors, p99 {r.p(0.99) * 1000:.1f} ms")
