"""Banned-client flood: client processes open connections from a banned source
address as fast as they can (connect, read the first line, close), while a
legitimate client from another address logs in and out every 50 ms. The figure
is refusals per second; the legitimate client's login latency shows whether the
flood starves real users.

The flood uses raw non-blocking sockets on the event loop (no StreamReader: the
client must not be what limits the rate), binds the source address with
IP_BIND_ADDRESS_NO_PORT (ports are then picked per destination at connect, not
exhausted by bind) and closes with an RST (SO_LINGER 0: no TIME_WAIT piles up
on either side at tens of thousands of connections a second)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import struct
import threading
import time
from typing import Any, Callable

from . import loadgen

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LINGER_RST = struct.pack("ii", 1, 0)


async def _flood(host: str, port: int, src: str, concurrency: int, start_at: float, stop_at: float,
                 refusal: tuple[bytes, ...]) -> dict[str, Any]:  # fmt: skip
    loop = asyncio.get_running_loop()
    c = {"rejects": 0, "other": 0, "errors": 0, "first_other": ""}

    async def one() -> None:
        while time.monotonic() < stop_at:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((src, 0))
                # No wait_for per call (it costs a task each): a server that
                # stalls is cut off by the bound on the whole flood below.
                await loop.sock_connect(sock, (host, port))
                buf = b""
                for _ in range(16):  # the first line, bounded
                    chunk = await loop.sock_recv(sock, 512)
                    buf += chunk
                    if not chunk or b"\n" in buf:
                        break
                if buf.startswith(refusal):
                    c["rejects"] += 1
                else:
                    c["other"] += 1
                    c["first_other"] = c["first_other"] or buf[:80].decode(errors="replace").strip() or "(closed)"
            except OSError:
                c["errors"] += 1
                await asyncio.sleep(0.001)
            finally:
                sock.close()

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, stop_at - time.monotonic()) + 0.05)
    c["seconds"] = time.monotonic() - t0
    # Connections still waiting at the end are not counted: only refusals the
    # server managed within the window make the rate (ProFTPD forks behind).
    c["unfinished"] = len(pending)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return c


def _reap(children: list) -> None:
    """Join the client processes; kill any that outlive a few seconds."""
    for ch in children:
        ch.join(5)
        if ch.is_alive():
            ch.kill()
            ch.join(5)


def _flood_proc(args: tuple[Any, ...], out: Any) -> None:
    cpu0 = os.times()
    try:
        c = loadgen.run(_flood(*args))
    except BaseException as e:  # report, never hang the parent
        c = {"rejects": 0, "other": 0, "errors": 0, "unfinished": 0, "seconds": 0.0, "failed": repr(e)}
    cpu1 = os.times()
    c["cpu_s"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    c["cpu_sys_s"] = cpu1.system - cpu0.system
    out.put(c)


async def _legit(host: str, port: int, src: str, user: str, password: str, every: float, start_at: float,
                 stop_at: float, done: Callable[[], bool] | None = None,
                 ) -> tuple[list[float], int, str, dict[str, float]]:  # fmt: skip
    """Log in and out every `every` seconds from `src` until `stop_at` (or `done()`);
    login latency is connect to 230. Also returns the slowest login's phases (ms):
    where a stall happened."""
    lat: list[float] = []
    errors, first_error = 0, ""
    slowest: dict[str, float] = {}
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    nxt = time.monotonic()
    while nxt < stop_at and not (done is not None and done()):
        t0 = time.monotonic()
        writer = None
        try:
            marks = [t0]
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=(src, 0)), 10)
            marks.append(time.monotonic())
            banner = await asyncio.wait_for(loadgen._reply(reader), 10)
            marks.append(time.monotonic())
            r = banner
            if banner.startswith(b"220"):
                r = await asyncio.wait_for(loadgen._cmd(reader, writer, f"USER {user}"), 10)
                marks.append(time.monotonic())
                if r.startswith(b"331"):
                    r = await asyncio.wait_for(loadgen._cmd(reader, writer, f"PASS {password}"), 10)
                    marks.append(time.monotonic())
            if not r.startswith(b"230"):
                raise ConnectionError(r.decode(errors="replace").strip())
            lat.append(marks[-1] - t0)
            if lat[-1] >= max(lat):
                phases = ("connect", "banner", "user", "pass")
                slowest = {ph: round((b - a) * 1000, 1) for ph, a, b in zip(phases, marks, marks[1:])}
            await asyncio.wait_for(loadgen._cmd(reader, writer, "QUIT"), 10)
        except (OSError, ConnectionError, asyncio.TimeoutError) as e:
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
        finally:
            if writer is not None:
                writer.close()
        nxt += every
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))
    return lat, errors, first_error, slowest


def run_flood(host: str, port: int, user: str, password: str, seconds: float, *, banned: str = "127.0.0.99",
              legit: str = "127.0.0.8", procs: int = 2, concurrency: int = 128,
              refusal: tuple[bytes, ...] = (b"530",)) -> dict[str, Any]:  # fmt: skip
    """Flood from `banned` with `procs` processes x `concurrency` connections for
    `seconds`, the legitimate client in this process meanwhile. Returns counts,
    the rate and the legitimate client's latencies (seconds)."""
    # Unflooded logins first: every node has verified the password (a per-node
    # cache) and the figure shows what the flood adds.
    now = time.monotonic()
    calm, _, _, _ = loadgen.run(_legit(host, port, legit, user, password, 0.05, now, now + 0.3))
    ctx = multiprocessing.get_context("fork")  # no loop is running here yet: forking is safe and fast
    out = ctx.Queue()
    start_at = time.monotonic() + 0.5  # children are up by then; all start together
    stop_at = start_at + seconds
    children = [ctx.Process(target=_flood_proc, args=((host, port, banned, concurrency, start_at, stop_at, refusal), out),
                            daemon=True) for _ in range(procs)]  # fmt: skip
    for ch in children:
        ch.start()
    try:
        lat, lerr, lfirst, slowest = loadgen.run(_legit(host, port, legit, user, password, 0.05, start_at, stop_at))
        got = []
        for _ in children:
            try:
                got.append(out.get(timeout=seconds + 30))
            except Exception:
                break
    finally:
        _reap(children)
    if len(got) < procs or any("failed" in g for g in got):
        raise RuntimeError(f"flood process failed: {[g.get('failed') for g in got]} ({len(got)}/{procs} reported)")
    span = max(g["seconds"] for g in got) or seconds
    total = {k: sum(g[k] for g in got) for k in ("rejects", "other", "errors", "unfinished", "cpu_s", "cpu_sys_s")}
    return {**total, "seconds": span, "rate": total["rejects"] / span,
            "first_other": next((g["first_other"] for g in got if g["first_other"]), ""),
            "legit": lat, "legit_errors": lerr, "legit_first_error": lfirst, "legit_slowest_ms": slowest,
            "calm": calm}  # fmt: skip


def _ban_proc(config: str, names: list[str], start_at: float, out: Any, cmd: str = "ban",
              stop_at: float = float("inf")) -> None:  # fmt: skip
    """One of the parallel banners: `ban host NAME --for 1h` (or `permit`), one
    control request each (what the CLI sends, without the interpreter start),
    until done or `stop_at`."""
    from ftpcluster import config as config_mod
    from ftpcluster.supervisor.control_client import call

    c: dict[str, Any] = {"ok": 0, "failed": 0, "first_error": ""}
    try:
        cfg = config_mod.load(config)
        time.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic()
        for name in names:
            if time.monotonic() > stop_at:
                break
            req = {"cmd": cmd, "kind": "host", "name": name}
            if cmd == "ban":
                req.update(duration=3600, reason="bench burst")
            reply = call(cfg, req)
            if reply.get("ok"):
                c["ok"] += 1
            else:
                c["failed"] += 1
                c["first_error"] = c["first_error"] or str(reply.get("error"))
        c["seconds"] = time.monotonic() - t0
    except BaseException as e:  # report, never hang the parent
        c["failed_proc"] = repr(e)
    out.put(c)


def burst_names(count: int, run: int) -> list[str]:
    """`count` distinct addresses in 10.<100+run>.0.0/16 (a fresh range per run)."""
    return [f"10.{100 + run}.{i // 256}.{i % 256}" for i in range(count)]


def run_ban_burst(host: str, port: int, user: str, password: str, config: str, names: list[str], *,
                  procs: int = 4, legit: str = "127.0.0.8", limit: float = 120.0) -> dict[str, Any]:  # fmt: skip
    """Ban `names` from `procs` processes in parallel while a legitimate client
    logs in every 50 ms; its logins before the burst (same run) are the baseline.
    The burst is cut at `limit` seconds (then `bans` < len(names))."""
    now = time.monotonic()
    calm, _, _, _ = loadgen.run(_legit(host, port, legit, user, password, 0.05, now, now + 1.0))
    ctx = multiprocessing.get_context("fork")  # no loop is running here yet
    out = ctx.Queue()
    start_at = time.monotonic() + 0.5
    stop_at = start_at + limit
    children = [ctx.Process(target=_ban_proc, args=(config, names[i::procs], start_at, out, "ban", stop_at),
                            daemon=True) for i in range(procs)]  # fmt: skip
    for ch in children:
        ch.start()
    got: list[dict[str, Any]] = []
    done = threading.Event()

    def collect() -> None:
        for _ in children:
            try:
                got.append(out.get(timeout=limit + 60))
            except Exception:
                break
        done.set()

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    try:
        lat, lerr, lfirst, slowest = loadgen.run(
            _legit(host, port, legit, user, password, 0.05, start_at, stop_at + 30, done=done.is_set))
        collector.join(30)
    finally:
        _reap(children)
    if len(got) < procs or any("failed_proc" in g for g in got):
        raise RuntimeError(f"ban process failed: {[g.get('failed_proc') for g in got]} ({len(got)}/{procs} reported)")
    return {"bans": sum(g["ok"] for g in got), "failed": sum(g["failed"] for g in got),
            "first_error": next((g["first_error"] for g in got if g["first_error"]), ""),
            "seconds": max(g["seconds"] for g in got), "legit": lat, "legit_errors": lerr,
            "legit_first_error": lfirst, "legit_slowest_ms": slowest, "calm": calm}  # fmt: skip


def permit_all(config: str, names: list[str], procs: int = 4) -> None:
    """Lift the burst's bans (not timed), so runs and later workloads start alike."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    children = [ctx.Process(target=_ban_proc, args=(config, names[i::procs], 0.0, out, "permit"), daemon=True)
                for i in range(procs)]  # fmt: skip
    for ch in children:
        ch.start()
    for ch in children:
        ch.join(600)
        if ch.is_alive():
            ch.kill()
            ch.join(5)
