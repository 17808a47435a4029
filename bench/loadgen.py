"""A load generator that can drive any FTP server: many concurrent asyncio clients
speaking raw FTP (no ftplib: the client must not be the bottleneck).

Workloads report operations per second; run in a separate process from the
server so both get a core."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    ops: int = 0
    errors: int = 0
    resumed: int = 0  # TLS handshakes that resumed a session
    offered: int = 0  # TLS handshakes that offered a session to resume
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
                      implicit: bool = False, session: object = None,
                      on_tls: Callable[[ssl.SSLObject], None] | None = None) -> object:  # fmt: skip
    """connect, (AUTH TLS), USER, PASS, QUIT; returns the TLS session for reuse.
    To resume, pass a ReuseContext whose next_session is set (asyncio's start_tls
    takes no session argument); `session` is kept for callers of the old API."""
    if session is not None and isinstance(tls, ReuseContext):
        tls.next_session = session
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
        if tls_obj is not None and on_tls is not None:
            on_tls(tls_obj)
        return tls_obj.session if tls_obj is not None else None
    finally:
        writer.close()


class ReuseContext(ssl.SSLContext):
    """A client context that offers `next_session` on its next handshake: asyncio
    and uvloop create the SSLObject through wrap_bio without a session argument."""

    next_session: Any = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):  # type: ignore[no-untyped-def,override]
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session or self.next_session)


def client_context(resume: bool = False) -> ssl.SSLContext:
    """An unverified client context (self-signed loopback peers); ReuseContext when
    the caller wants to resume sessions, one per client so sessions don't mix."""
    ctx = ReuseContext(ssl.PROTOCOL_TLS_CLIENT) if resume else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def sessions(host: str, port: int, user: str, password: str, concurrency: int, duration: float,
                   tls: ssl.SSLContext | None = None, implicit: bool = False, resume: bool = False,
                   endpoints: list[tuple[str, int]] | None = None) -> Result:  # fmt: skip
    """Session churn for `duration` seconds. With `resume`, every client keeps its
    own context and offers the session (or ticket) from its previous connection.
    With `endpoints`, each client goes round them, one connection each (so a
    resumed session always comes from another host when there are two)."""
    res = Result()
    deadline = time.monotonic() + duration
    ends = endpoints or [(host, port)]
    started = 0

    def count(obj: ssl.SSLObject) -> None:
        if obj.session_reused:
            res.resumed += 1

    async def worker() -> None:
        nonlocal started
        ctx = tls
        if resume and tls is not None:
            ctx = client_context(resume=True)
            ctx.minimum_version, ctx.maximum_version = tls.minimum_version, tls.maximum_version
        session = None
        k = started  # clients start on different hosts
        started += 1
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            h, p = ends[k % len(ends)]
            k += 1
            try:
                if isinstance(ctx, ReuseContext):
                    ctx.next_session = session
                    res.offered += session is not None
                got = await asyncio.wait_for(one_session(h, p, user, password, ctx, implicit, on_tls=count), 10)
                if resume:
                    session = got
                res.ops += 1
                res.latencies.append(time.monotonic() - t0)
            except (OSError, ConnectionError, asyncio.TimeoutError, ssl.SSLError):
                res.errors += 1
                session = None
                await asyncio.sleep(0.01)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.seconds = time.monotonic() - t0
    return res


async def hold_idle(host: str, port: int, user: str, password: str, n: int, measure: Callable[[], Any],
                    concurrency: int = 64, settle: float = 2.0, timeout: float = 300) -> tuple[int, int, Any]:  # fmt: skip
    """Open `n` logged-in sessions and keep them idle, call `measure()` while they
    are held, then close them. Returns (held, errors, what measure returned)."""
    held: list[asyncio.StreamWriter] = []
    errors = 0
    sem = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + timeout

    async def opener() -> None:
        nonlocal errors
        async with sem:
            if time.monotonic() > deadline:
                errors += 1
                return
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
                banner = await asyncio.wait_for(_reply(reader), 10)
                r = await asyncio.wait_for(_cmd(reader, writer, f"USER {user}"), 10)
                if banner.startswith(b"220") and r.startswith(b"331"):
                    r = await asyncio.wait_for(_cmd(reader, writer, f"PASS {password}"), 10)
                if not r.startswith(b"230"):
                    raise ConnectionError(r.decode(errors="replace").strip())
                held.append(writer)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                errors += 1
                if writer is not None:
                    writer.close()

    try:
        await asyncio.gather(*(opener() for _ in range(n)))
        await asyncio.sleep(settle)
        got = measure()
    finally:
        for w in held:
            w.close()
    await asyncio.sleep(0.5)
    return len(held), errors, got


async def _login(host: str, port: int, user: str, password: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    banner = await _reply(reader)
    if not banner.startswith(b"220"):
        writer.close()
        raise ConnectionError(banner.decode(errors="replace").strip())
    r = await _cmd(reader, writer, f"USER {user}")
    if r.startswith(b"331"):
        r = await _cmd(reader, writer, f"PASS {password}")
    if not r.startswith(b"230"):
        writer.close()
        raise ConnectionError(r.decode(errors="replace").strip())
    return reader, writer


def _passive_port(reply: bytes, epsv: bool) -> int:
    text = reply.decode(errors="replace")
    if epsv:  # 229 Entering Extended Passive Mode (|||port|)
        return int(text[text.index("(") + 1 : text.rindex(")")].split(text[text.index("(") + 1])[3])
    nums = text[text.index("(") + 1 : text.rindex(")")].split(",")  # 227 ... (h1,h2,h3,h4,p1,p2)
    return int(nums[4]) * 256 + int(nums[5])


async def small_retrs(host: str, port: int, user: str, password: str, path: str, size: int, duration: float) -> Result:
    """One logged-in session doing EPSV (PASV if refused) + RETR of a small file
    back to back for `duration` seconds: per-command and per-data-connection
    cost, which bulk transfers hide. A short or failed transfer is an error."""
    res = Result()
    reader, writer = await asyncio.wait_for(_login(host, port, user, password), 10)
    try:
        r = await _cmd(reader, writer, "TYPE I")
        epsv = True
        deadline = time.monotonic() + duration
        t_start = time.monotonic()
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            r = await asyncio.wait_for(_cmd(reader, writer, "EPSV" if epsv else "PASV"), 10)
            if epsv and not r.startswith(b"229"):
                epsv = False
                continue
            if not r.startswith((b"229", b"227")):
                raise ConnectionError(r.decode(errors="replace").strip())
            dr, dw = await asyncio.wait_for(asyncio.open_connection(host, _passive_port(r, epsv)), 10)
            try:
                r = await asyncio.wait_for(_cmd(reader, writer, f"RETR {path}"), 10)
                if not r.startswith((b"150", b"125")):
                    raise ConnectionError(r.decode(errors="replace").strip())
                got = len(await asyncio.wait_for(dr.read(), 10))
            finally:
                dw.close()
            r = await asyncio.wait_for(_reply(reader), 10)
            if r.startswith(b"226") and got == size:
                res.ops += 1
                res.latencies.append(time.monotonic() - t0)
            else:
                res.errors += 1
        res.seconds = time.monotonic() - t_start
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_cmd(reader, writer, "QUIT"), 2)
    finally:
        writer.close()
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
