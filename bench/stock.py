"""Workloads driven by a client that writes like a stock one: Nagle's algorithm on
(ftplib and most GUI clients never set TCP_NODELAY), each command, handshake flight
and data block its own write. asyncio and uvloop set TCP_NODELAY on every transport,
which is why the other workloads could not see delayed-ACK stalls; here it is turned
back off on every socket before its first byte. Plain asyncio, not uvloop: under
uvloop the client's last handshake flight and its next command left in one segment
(no stall to see, measured), where asyncio, like ftplib, makes one send() per write.
Each operation is timed by phase (p50/p99 in the sample's detail, `<phase>_p50_ms`)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import loadgen
from .loadgen import ReuseContext, _passive_port, _reply
from .peers import Peer
from .procs import cpu_seconds, self_cpu_seconds

if TYPE_CHECKING:
    from .workloads import Sample, Settings

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass
class Phases:
    ops: int = 0
    errors: int = 0
    resumed: int = 0
    seconds: float = 0.0
    first_error: str = ""
    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.times.setdefault(phase, []).append(now - t0)
        return now

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ops": self.ops, "errors": self.errors}
        for phase, xs in self.times.items():
            xs = sorted(xs)
            out[f"{phase}_p50_ms"] = round(xs[len(xs) // 2] * 1000, 2)
            out[f"{phase}_p99_ms"] = round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000, 2)
        if self.first_error:
            out["first_error"] = self.first_error[:120]
        return out


def _nagle_on(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    _nagle_on(writer)
    return reader, writer


async def _cmd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str, ok: tuple[bytes, ...]) -> bytes:
    writer.write(line.encode() + b"\r\n")
    r = await _reply(reader)
    if not r.startswith(ok):
        raise ConnectionError(f"{line.split()[0]}: {r.decode(errors='replace').strip()}")
    return r


class Client:
    """One FTPS session, explicit TLS, PROT P, data connections resuming its session."""

    def __init__(self, host: str, port: int, user: str, password: str, version: str | None, ph: Phases) -> None:
        self.host, self.port, self.user, self.password, self.ph = host, port, user, password, ph
        self.ctx = loadgen.client_context(resume=True)
        if version:
            self.ctx.minimum_version = self.ctx.maximum_version = TLS_VERSIONS[version]
        self.reader: Any = None
        self.writer: Any = None

    async def login(self, offer: Any = None) -> Any:
        """connect, AUTH TLS (offering `offer`), USER, PASS, PBSZ/PROT P, TYPE I; phases
        connect, tls, login, prot. Returns the TLS session (to offer next time)."""
        t = time.perf_counter()
        self.reader, self.writer = await _open(self.host, self.port)
        await _reply(self.reader)
        t = self.ph.add("connect", t)
        await _cmd(self.reader, self.writer, "AUTH TLS", (b"234",))
        assert isinstance(self.ctx, ReuseContext)
        self.ctx.next_session = offer
        await self.writer.start_tls(self.ctx, server_hostname=None)  # type: ignore[call-arg]
        obj = self.writer.get_extra_info("ssl_object")
        self.ph.resumed += bool(obj.session_reused)
        t = self.ph.add("tls", t)
        await _cmd(self.reader, self.writer, f"USER {self.user}", (b"331", b"230"))
        await _cmd(self.reader, self.writer, f"PASS {self.password}", (b"230",))
        t = self.ph.add("login", t)
        await _cmd(self.reader, self.writer, "PBSZ 0", (b"200",))
        await _cmd(self.reader, self.writer, "PROT P", (b"200",))
        await _cmd(self.reader, self.writer, "TYPE I", (b"200",))
        self.ph.add("prot", t)
        return obj.session

    async def quit(self) -> None:
        t = time.perf_counter()
        try:
            await _cmd(self.reader, self.writer, "QUIT", (b"221",))
            self.ph.add("quit", t)
        finally:
            self.writer.close()

    async def transfer(self, cmd: str, upload: bytes | None = None, tag: str = "") -> int:
        """EPSV, the command (150), the data over TLS, 226; phases <tag>pasv,
        <tag>open (command to 150, data connection and its handshake), <tag>data, <tag>done."""
        r, w = self.reader, self.writer
        t = time.perf_counter()
        reply = await _cmd(r, w, "EPSV", (b"229",))
        dr, dw = await _open(self.host, _passive_port(reply, True))
        t = self.ph.add(tag + "pasv", t)
        try:
            # Like ftplib: the command, its 150, then the handshake on the data connection.
            await _cmd(r, w, cmd, (b"150", b"125"))
            self.ctx.next_session = w.get_extra_info("ssl_object").session  # type: ignore[attr-defined]
            await dw.start_tls(self.ctx, server_hostname=None)  # type: ignore[call-arg]
            t = self.ph.add(tag + "open", t)
            if upload is not None:
                dw.write(upload)
                await dw.drain()
                moved = len(upload)
            else:
                moved = len(await dr.read())
        finally:
            dw.close()
            try:
                await dw.wait_closed()  # close_notify, after the data: a write of its own
            except (OSError, ssl.SSLError):
                pass
        t = self.ph.add(tag + "data", t)
        await self._done()
        self.ph.add(tag + "done", t)
        return moved

    async def _done(self) -> None:
        r = await _reply(self.reader)
        if not r.startswith((b"226", b"250")):
            raise ConnectionError(r.decode(errors="replace").strip())


async def _repeat(ph: Phases, duration: float, concurrency: int,
                  one: Callable[[int, dict[str, Any]], Awaitable[None]]) -> Phases:  # fmt: skip
    """`one(worker, state)` back to back in `concurrency` workers for `duration` s."""
    deadline = time.monotonic() + duration

    async def worker(k: int) -> None:
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(one(k, state), 30)
                ph.ops += 1
            except (OSError, ConnectionError, asyncio.TimeoutError, ssl.SSLError) as e:
                ph.errors += 1
                ph.first_error = ph.first_error or f"{type(e).__name__}: {e}"
                state.clear()
                await asyncio.sleep(0.01)

    t0 = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    ph.seconds = time.monotonic() - t0
    return ph


def resumed_sessions(host: str, port: int, user: str, password: str, version: str, concurrency: int,
                     duration: float) -> Phases:  # fmt: skip
    """Session churn, each session offering the one before it: connect, AUTH TLS
    (resumed), USER, PASS, PBSZ, PROT, TYPE, QUIT."""
    ph = Phases()

    async def one(k: int, state: dict[str, Any]) -> None:
        c = state.get("client") or Client(host, port, user, password, version, ph)
        state["client"] = c
        t0 = time.perf_counter()
        state["session"] = await c.login(state.get("session"))
        await c.quit()
        ph.add("session", t0)

    return asyncio.run(_repeat(ph, duration, concurrency, one))


def one_session(host: str, port: int, user: str, password: str, what: str, duration: float, name: str) -> Phases:
    """1 KB STOR (`what` = "stor") or RETR of `name` back to back on one session."""
    ph = Phases()
    data = b"s" * 1024

    async def run() -> Phases:
        c = Client(host, port, user, password, None, ph)
        await c.login()
        if what == "retr":
            await c.transfer(f"STOR {name}", data)  # the file to fetch
        ph.times.clear()

        async def one(k: int, state: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            if what == "stor":
                await c.transfer(f"STOR {name}", data)
            else:
                got = await c.transfer(f"RETR {name}")
                if got != len(data):
                    raise ConnectionError(f"RETR gave {got} bytes")
            ph.add("op", t0)

        try:
            return await _repeat(ph, duration, 1, one)
        finally:
            await c.quit()

    return asyncio.run(run())


def small_files(host: str, port: int, user: str, password: str, concurrency: int, duration: float,
                files: int = 20, size: int = 4096) -> Phases:  # fmt: skip
    """Whole sessions: login (resumed after the first), `files` x STOR, LIST,
    `files` x RETR, QUIT; each worker in its own directory-less file names."""
    ph = Phases()
    data = b"f" * size

    async def one(k: int, state: dict[str, Any]) -> None:
        c = state.get("client") or Client(host, port, user, password, None, ph)
        state["client"] = c
        t0 = time.perf_counter()
        state["session"] = await c.login(state.get("session"))
        for i in range(files):
            await c.transfer(f"STOR w{k}-{i}.bin", data, "stor_")
        t = time.perf_counter()
        await c.transfer("LIST", None, "list_")
        ph.add("list", t)
        for i in range(files):
            if await c.transfer(f"RETR w{k}-{i}.bin", None, "retr_") != size:
                raise ConnectionError("short RETR")
        await c.quit()
        ph.add("session", t0)

    return asyncio.run(_repeat(ph, duration, concurrency, one))


# ------------------------------------------------------------------ workloads
# bench.workloads lists these; Sample is imported when they run (no import cycle).

CONCURRENCY = 8  # stock clients churning sessions at once
SMALL_FILES_CONCURRENCY = 4


def _measured(peer: Peer, run: Callable[[], Phases], what: str) -> Sample:
    from .workloads import Sample

    srv0, cli0 = cpu_seconds(peer.root_pid()), self_cpu_seconds()
    ph = run()
    srv, cli = cpu_seconds(peer.root_pid()) - srv0, self_cpu_seconds() - cli0
    if ph.ops == 0:
        raise RuntimeError(f"no {what} completed ({ph.errors} errors; {ph.first_error})")
    detail = ph.detail()
    detail["server_cpu_ms_per_op"] = round(srv * 1000 / ph.ops, 3)
    detail["client_cpu"] = round(cli / ph.seconds, 2) if ph.seconds else None
    if ph.resumed:
        detail["resumed"] = ph.resumed
    return Sample(ph.ops / ph.seconds, detail)


def _resumed(peer: Peer, s: Settings, version: str) -> Sample:
    def go(seconds: float) -> Phases:
        return resumed_sessions(peer.host, peer.port, peer.user, peer.password, version, CONCURRENCY, seconds)

    go(s.warmup)
    return _measured(peer, lambda: go(s.duration), "session")


def stock_resumed_12(peer: Peer, s: Settings) -> Sample:
    return _resumed(peer, s, "1.2")


def stock_resumed_13(peer: Peer, s: Settings) -> Sample:
    return _resumed(peer, s, "1.3")


def _one_session(peer: Peer, s: Settings, what: str) -> Sample:
    duration = min(s.duration, 2.0) if s.quick else s.duration
    run = lambda: one_session(peer.host, peer.port, peer.user, peer.password, what, duration, f"stock-{what}.bin")  # noqa: E731
    return _measured(peer, run, what.upper())


def stock_stor_1k(peer: Peer, s: Settings) -> Sample:
    return _one_session(peer, s, "stor")


def stock_retr_1k(peer: Peer, s: Settings) -> Sample:
    return _one_session(peer, s, "retr")


def stock_small_files(peer: Peer, s: Settings) -> Sample:
    def go(seconds: float) -> Phases:
        return small_files(peer.host, peer.port, peer.user, peer.password, SMALL_FILES_CONCURRENCY, seconds)

    go(0.1)  # one session per client: logins verified once, sessions to resume
    return _measured(peer, lambda: go(s.duration), "session")
