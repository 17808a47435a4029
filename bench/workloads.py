"""The workloads, each a function (peer, settings) -> one sample. The same client
drives every peer: bench.loadgen for session churn and idle sessions, curl for
bulk transfers (C speed, so the client is not the bottleneck)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import flood, loadgen
from .peers import Files, Peer
from .procs import cpu_seconds, memory_kb, self_cpu_seconds

MiB = 1 << 20


@dataclass
class Settings:
    quick: bool
    duration: float  # seconds per session-churn run
    concurrency: int = 32
    warmup: float = 0.5  # seconds of unmeasured churn before each measured run
    idle_sessions: int = 1000
    proftpd_idle_cap: int = 1000  # one process per session: 10,000 of them is a fork bomb
    files: Files | None = None
    nodes: int = 2  # ftpcluster nodes of the main peer (the two-host clusters split them)
    # Servers a workload starts itself (two-host clusters), kept across runs and
    # workloads; `cleanups` are called once at the end of the bench.
    fixtures: dict[str, Any] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    base: Path | None = None  # the bench's temp dir
    flood_seconds: float = 5.0  # ban_flood: seconds of flood per run


class Skip(Exception):
    """The workload does not apply to this peer; the message becomes a note."""


@dataclass
class Sample:
    value: float
    detail: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # how this peer was measured, printed once under the table


@dataclass
class Workload:
    name: str
    title: str
    unit: str
    run: Callable[[Peer, Settings], Sample]
    higher_is_better: bool = True
    # target: (peer, minimum ratio) or ("absolute", bound)
    targets: list[tuple[str, float]] = field(default_factory=list)
    op: str = "session"  # what server_cpu_ms_per_op counts
    # More rows, each a number the run put in Sample.detail.
    extra: list[Extra] = field(default_factory=list)
    # Targets on the server-CPU-per-op row: (peer, maximum ratio ftpcluster ÷ peer).
    cpu_targets: list[tuple[str, float]] = field(default_factory=list)
    # A session workload: also run on ftpcluster at log level warning, so the
    # cost of the default (info) session logging stays visible.
    log_levels: bool = False


@dataclass
class Extra:
    key: str  # in Sample.detail
    title: str
    unit: str
    higher_is_better: bool = True
    targets: list[tuple[str, float]] = field(default_factory=list)


def _tls_context() -> ssl.SSLContext:
    return loadgen.client_context()


def _churn(peer: Peer, s: Settings, tls: bool, resume: bool) -> Sample:
    ctx = _tls_context() if tls else None
    # Warm-up (not measured): cold caches (ftpcluster's argon2 verification cache,
    # TLS session caches) and lazily started workers would otherwise weigh in.
    loadgen.run(loadgen.sessions(peer.host, peer.port, peer.user, peer.password, s.concurrency, s.warmup, tls=ctx, resume=resume))
    srv0, cli0 = cpu_seconds(peer.root_pid()), self_cpu_seconds()
    r = loadgen.run(
        loadgen.sessions(peer.host, peer.port, peer.user, peer.password, s.concurrency, s.duration, tls=ctx, resume=resume)
    )
    srv, cli = cpu_seconds(peer.root_pid()) - srv0, self_cpu_seconds() - cli0
    detail = {"ops": r.ops, "errors": r.errors, "p50_ms": round(r.p(0.5) * 1000, 2), "p99_ms": round(r.p(0.99) * 1000, 2),
              # server CPU per session: comparable even when the client or the
              # shared machine caps the rate; client_cpu near 1.0 = client-bound
              "server_cpu_ms_per_op": round(srv * 1000 / r.ops, 3) if r.ops else None,
              "client_cpu": round(cli / r.seconds, 2) if r.seconds else None}  # fmt: skip
    if tls:
        detail["resumed"] = r.resumed
    return Sample(r.rate, detail)


def sessions(peer: Peer, s: Settings) -> Sample:
    return _churn(peer, s, tls=False, resume=False)


def ftps_full(peer: Peer, s: Settings) -> Sample:
    return _churn(peer, s, tls=True, resume=False)


def ftps_resumed(peer: Peer, s: Settings) -> Sample:
    return _churn(peer, s, tls=True, resume=True)


def _curl(args: list[str], direction: str, timeout: float = 600) -> Sample:
    """One curl transfer. The figure is bytes over the transfer phase only
    (time_total - time_pretransfer): at GB/s on loopback a 256 MiB file moves in
    ~0.2 s, and connect + login would otherwise be a visible share of it."""
    fmt = f"%{{size_{direction}}} %{{time_pretransfer}} %{{time_total}} %{{speed_{direction}}}"
    r = subprocess.run(["curl", "-s", "-S", "--max-time", str(int(timeout)), *args, "-w", fmt],
                       capture_output=True, text=True, timeout=timeout + 10)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"curl exit {r.returncode}: {r.stderr.strip()[:200]}")
    size, pre, total, avg = (float(x) for x in r.stdout.split()[-4:])
    phase = max(total - pre, 1e-6)
    return Sample(size / phase / MiB, {"bytes": int(size), "seconds": round(phase, 3), "setup_s": round(pre, 4),
                                       "curl_avg_mib_s": round(avg / MiB, 1)})  # fmt: skip


def retr(peer: Peer, s: Settings) -> Sample:
    assert s.files is not None
    return _curl(["-o", "/dev/null", peer.url("/" + s.files.big.name)], "download")


def retr_tls(peer: Peer, s: Settings) -> Sample:
    assert s.files is not None
    return _curl(["--ssl-reqd", "-k", "-o", "/dev/null", peer.url("/" + s.files.big.name)], "download")


def stor(peer: Peer, s: Settings) -> Sample:
    assert s.files is not None
    return _curl(["-T", str(s.files.big), peer.url("/upload.bin")], "upload")


def retr_1k(peer: Peer, s: Settings) -> Sample:
    """1 KB RETRs back to back on one logged-in session (EPSV + RETR each)."""
    assert s.files is not None and s.files.small is not None
    small = s.files.small
    duration = min(s.duration, 2.0) if s.quick else s.duration
    loadgen.run(loadgen.small_retrs(peer.host, peer.port, peer.user, peer.password, "/" + small.name, 1024, 0.3))
    srv0, cli0 = cpu_seconds(peer.root_pid()), self_cpu_seconds()
    r = loadgen.run(loadgen.small_retrs(peer.host, peer.port, peer.user, peer.password, "/" + small.name, 1024, duration))
    srv, cli = cpu_seconds(peer.root_pid()) - srv0, self_cpu_seconds() - cli0
    if r.ops == 0:
        raise RuntimeError(f"no transfer completed ({r.errors} errors)")
    return Sample(r.rate, {"ops": r.ops, "errors": r.errors, "p50_ms": round(r.p(0.5) * 1000, 2),
                           "p99_ms": round(r.p(0.99) * 1000, 2),
                           "server_cpu_ms_per_op": round(srv * 1000 / r.ops, 3),
                           "client_cpu": round(cli / r.seconds, 2) if r.seconds else None})  # fmt: skip


BANNED, LEGIT = "127.0.0.99", "127.0.0.8"


def _first_line(host: str, port: int, src: str, timeout: float = 2.0) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=timeout, source_address=(src, 0)) as c:
            return c.recv(200)
    except OSError:
        return b""


def ban_flood(peer: Peer, s: Settings) -> Sample:
    """Refusals/s of a banned address flooding the server (2 client processes),
    and a legitimate client's login latency meanwhile."""
    if peer.ban_host is None or peer.permit_host is None:
        raise Skip("no host bans in pyftpdlib" if peer.name == "pyftpdlib" else "no static host ban")
    peer.ban_host(BANNED)
    try:
        deadline = time.monotonic() + 5  # nodes notice a new ban within 0.25 s
        while not _first_line(peer.host, peer.port, BANNED).startswith(b"530"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{BANNED} still admitted 5 s after the ban")
            time.sleep(0.05)
        srv0 = cpu_seconds(peer.root_pid())
        r = flood.run_flood(peer.host, peer.port, peer.user, peer.password, s.flood_seconds,
                            banned=BANNED, legit=LEGIT)  # fmt: skip
        srv = cpu_seconds(peer.root_pid()) - srv0
    finally:
        peer.permit_host(BANNED)
    lat = sorted(r["legit"])
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else None  # noqa: E731
    detail = {"rejects": r["rejects"], "other": r["other"], "errors": r["errors"], "unfinished": r["unfinished"],
              "seconds": round(r["seconds"], 2),
              "legit_logins": len(lat), "legit_errors": r["legit_errors"],
              "legit_p50_ms": pick(0.5), "legit_p99_ms": pick(0.99),
              "server_cpu_ms_per_op": round(srv * 1000 / r["rejects"], 4) if r["rejects"] else None,
              # the rate one server core would sustain if the client kept up
              "rejects_per_core_s": round(r["rejects"] / srv) if srv > 0 else None,
              "client_cpu": round(r["cpu_s"] / r["seconds"], 2) if r["seconds"] else None}  # fmt: skip
    calm = sorted(r["calm"])
    detail["calm_login_p50_ms"] = round(calm[len(calm) // 2] * 1000, 2) if calm else None
    detail["legit_slowest_ms"] = r["legit_slowest_ms"]
    if r["first_other"]:
        detail["first_other"] = r["first_other"]
    if r["legit_first_error"]:
        detail["legit_first_error"] = r["legit_first_error"]
    if not lat:
        raise RuntimeError(f"the legitimate client never logged in: {r['legit_first_error']}")
    how = ("static ban through mod_ban's control (`ftpdctl ban host`, a BanTable entry); refused with "
           "530 at session start, after ProFTPD forked" if peer.name == "proftpd" else "")  # fmt: skip
    return Sample(r["rate"], detail, how)


def ban_burst(peer: Peer, s: Settings) -> Sample:
    """A legitimate client's login latency while 5,000 host bans are added (4
    processes in parallel, one control request each; cut at 120 s, then `bans`
    says how many were made), against its latency just before the burst in the
    same run. ftpcluster only: the others have no
    ban command that takes thousands of bans in seconds."""
    if peer.name != "ftpcluster" or peer.config is None:
        raise Skip("no ban command for thousands of bans (ftpdctl forks per ban)" if peer.name == "proftpd"
                   else "no host bans")  # fmt: skip
    run = s.fixtures["ban_burst_runs"] = s.fixtures.get("ban_burst_runs", 0) + 1
    names = flood.burst_names(1000 if s.quick else 5000, run)
    try:
        r = flood.run_ban_burst(peer.host, peer.port, peer.user, peer.password, str(peer.config), names, legit=LEGIT)
    finally:
        flood.permit_all(str(peer.config), names)
    lat, calm = sorted(r["legit"]), sorted(r["calm"])
    if not lat:
        raise RuntimeError(f"the legitimate client never logged in: {r['legit_first_error']}")
    pick = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2) if xs else None  # noqa: E731
    detail = {"bans": r["bans"], "of": len(names), "failed": r["failed"], "burst_s": round(r["seconds"], 2),
              "bans_per_s": round(r["bans"] / r["seconds"]) if r["seconds"] else None,
              "legit_logins": len(lat), "legit_errors": r["legit_errors"],
              "legit_p50_ms": pick(lat, 0.5), "legit_p99_ms": pick(lat, 0.99), "legit_max_ms": pick(lat, 1.0),
              "calm_login_p50_ms": pick(calm, 0.5), "legit_slowest_ms": r["legit_slowest_ms"]}  # fmt: skip
    if r["first_error"]:
        detail["first_error"] = r["first_error"]
    return Sample(detail["legit_p50_ms"], detail)


def idle_memory(peer: Peer, s: Settings) -> Sample:
    """KB per idle logged-in session: the server tree's PSS before and while N
    sessions are held, divided by N (RSS alongside)."""
    n = min(s.idle_sessions, s.proftpd_idle_cap) if peer.name == "proftpd" else s.idle_sessions
    root = peer.root_pid()
    before = memory_kb(root)
    held, errors, during = loadgen.run(
        loadgen.hold_idle(peer.host, peer.port, peer.user, peer.password, n, lambda: memory_kb(root))
    )
    if held == 0:
        raise RuntimeError(f"no session could be held ({errors} errors)")
    per_pss = (during["pss_kb"] - before["pss_kb"]) / held
    per_rss = (during["rss_kb"] - before["rss_kb"]) / held
    return Sample(per_pss, {"sessions": held, "errors": errors, "rss_kb_per_session": round(per_rss, 2),
                            "before": before, "during": during})  # fmt: skip


from .cluster import ban_propagation, ftps_cross_host, ftps_memcached_hung  # noqa: E402 (it uses the types above)
from . import stock  # noqa: E402 (the same)
from .limits import quota_drift, rate_error, retr_limit_idle  # noqa: E402

def _phase_rows(*phases: str) -> list[Extra]:
    return [Extra(f"{p}_{q}_ms", f"{p} {q}", "ms", higher_is_better=False) for p in phases for q in ("p50", "p99")]


# idle_memory first: right after start (and a short warm-up) the heap has not yet
# grown from churn, so the sessions we hold have to allocate what they cost.
WORKLOADS: list[Workload] = [
    Workload("idle_memory", "memory per idle session (PSS)", "KB", idle_memory, higher_is_better=False,
             targets=[("absolute", 20.0)]),  # fmt: skip
    Workload("sessions", "sessions/s (connect, login, quit; c=32)", "/s", sessions, targets=[("pyftpdlib", 1.5)],
             cpu_targets=[("pyftpdlib", 0.67)], log_levels=True),
    Workload("ftps_full", "FTPS sessions/s, full handshake", "/s", ftps_full, log_levels=True),
    Workload("ftps_resumed", "FTPS sessions/s, resumed", "/s", ftps_resumed, targets=[("pyftpdlib", 1.5)],
             cpu_targets=[("pyftpdlib", 0.8)], log_levels=True),
    Workload("retr", "RETR big file, plain", "MiB/s", retr, targets=[("proftpd", 1.0)]),
    Workload("retr_tls", "RETR big file, TLS", "MiB/s", retr_tls, targets=[("proftpd", 1.0)]),
    Workload("stor", "STOR big file, plain", "MiB/s", stor),
    Workload("retr_1k", "1 KB RETR/s on one session (EPSV+RETR)", "/s", retr_1k, op="RETR",
             cpu_targets=[("proftpd", 1.0)], log_levels=True),
    Workload("ban_flood", "banned-client flood: rejects/s (2 client procs)", "/s", ban_flood, op="reject",
             targets=[("absolute", 20000.0)],
             extra=[Extra("legit_p50_ms", "legit login p50 during flood", "ms", higher_is_better=False),
                    Extra("legit_p99_ms", "legit login p99 during flood", "ms", higher_is_better=False),
                    Extra("rejects_per_core_s", "rejects per server CPU-second", "/s")]),  # fmt: skip
    Workload("ban_burst", "legit login p50 during a burst of 5,000 bans (4 in parallel)", "ms", ban_burst,
             higher_is_better=False,
             extra=[Extra("legit_p99_ms", "legit login p99 during the ban burst", "ms", higher_is_better=False),
                    Extra("calm_login_p50_ms", "legit login p50 just before the burst", "ms", higher_is_better=False),
                    Extra("bans_per_s", "bans/s through the control socket (4 in parallel)", "/s")]),  # fmt: skip
    # Driven by a client with Nagle on, as ftplib and most GUI clients are (the ones
    # above set TCP_NODELAY): what delayed-ACK stalls would cost. Per-phase p50/p99 in details.
    Workload("stock_ftps_resumed_12", "stock client (Nagle on): FTPS sessions/s, resumed TLS 1.2, c=8", "/s",
             stock.stock_resumed_12, targets=[("pyftpdlib", 1.5)], extra=_phase_rows("session", "login")),
    Workload("stock_ftps_resumed_13", "stock client (Nagle on): FTPS sessions/s, resumed TLS 1.3, c=8", "/s",
             stock.stock_resumed_13, targets=[("pyftpdlib", 1.5)], extra=_phase_rows("session", "login")),
    Workload("stock_stor_1k", "stock client: 1 KB STOR/s over PROT P, one session", "/s", stock.stock_stor_1k,
             op="STOR", extra=_phase_rows("op", "open", "data")),
    Workload("stock_retr_1k", "stock client: 1 KB RETR/s over PROT P, one session", "/s", stock.stock_retr_1k,
             op="RETR", extra=_phase_rows("op", "open", "data")),
    Workload("stock_small_files", "stock client: FTPS sessions/s of 20x4 KB STOR, LIST, 20x RETR; c=4", "/s",
             stock.stock_small_files, targets=[("pyftpdlib", 1.5)],
             extra=_phase_rows("session", "login", "stor_data", "retr_open")),
    Workload("ban_propagation", "ban propagation host A -> B, p99", "s", ban_propagation, higher_is_better=False,
             targets=[("absolute", 1.0)], extra=[Extra("p50_s", "ban propagation p50", "s", higher_is_better=False)]),
    Workload("ftps_cross_host", "FTPS cross-host sessions/s, cluster tickets", "/s", ftps_cross_host,
             extra=[Extra("resumed_pct", "resumed on the other host, cluster tickets", "%"),
                    Extra("off_rate", "FTPS cross-host sessions/s, tickets off (TLS 1.2 cache)", "/s"),
                    Extra("off_resumed_pct", "resumed on the other host, tickets off", "%"),
                    Extra("off_server_cpu_ms_per_op", "server CPU per session (tickets off)", "ms",
                          higher_is_better=False)]),  # fmt: skip
    Workload("retr_limit_idle", "RETR big file, rate limit configured, not hit", "MiB/s", retr_limit_idle,
             extra=[Extra("unlimited_mib_s", "RETR big file, same run, no limit", "MiB/s"),
                    Extra("difference_pct", "limited vs unlimited", "%")]),  # fmt: skip
    Workload("rate_error", "cluster rate: 3 sessions over 2 hosts, over the limit by", "%", rate_error,
             higher_is_better=False, targets=[("absolute", 10.0)]),  # fmt: skip
    Workload("quota_drift", "quota usage error after 1,000 uploads/deletes over 2 hosts", "bytes", quota_drift,
             higher_is_better=False, extra=[Extra("error_files", "quota usage error, files", "files",
                                                  higher_is_better=False)]),  # fmt: skip
    Workload("ftps_memcached_hung", "FTPS cross-host sessions/s, memcached hung (tickets off)", "/s",
             ftps_memcached_hung,
             extra=[Extra("healthy_rate", "FTPS cross-host sessions/s, memcached healthy (same run)", "/s"),
                    Extra("hung_vs_healthy_pct", "hung vs healthy", "%"),
                    Extra("hung_p99_ms", "FTPS session p99, memcached hung", "ms", higher_is_better=False),
                    Extra("healthy_resumed_pct", "resumed on the other host, memcached healthy", "%")]),  # fmt: skip
]
BY_NAME = {w.name: w for w in WORKLOADS}
