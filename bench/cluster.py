"""Cross-host workloads, ftpcluster only: two hosts (two supervisors with their
own state dirs) sharing one memcached, one certificate and one cluster key, as
a deployment behind a balancer would. The pairs are started on first use and
kept for the rest of the bench (Settings.fixtures), stopped at its end.

- ban_propagation: a ban made on host A (control socket, as `ftpcluster ban`
  does), timed until host B refuses that address at the door.
- ftps_cross_host: FTPS sessions that alternate between the hosts and offer
  the session from the previous connection, so every resumption is cross-host:
  with cluster ticket keys (TLS 1.3 tickets) and, on a pair with tickets off,
  through the memcached session cache (TLS 1.2 session ids).
- ftps_memcached_hung: the tickets-off churn (TLS 1.2 session ids) on a pair
  with a memcached of its own, healthy and then SIGSTOPped, in the same run:
  what a hung cache costs (full handshakes, and no stall)."""

from __future__ import annotations

import random
import shutil
import signal
import ssl
import time
from typing import Any

from ftpcluster import config as config_mod
from ftpcluster.supervisor.control_client import call
from tests.support_memcached import Memcached, start_memcached
from tests.support_server import Server, cli, make_server, wait_port

from . import loadgen
from .peers import MAX_SESSIONS, Peer
from .procs import cpu_seconds, self_cpu_seconds
from .workloads import Sample, Settings, Skip, _first_line

BAN_TIMEOUT = 5.0  # seconds a ban may take to reach host B before it counts as lost
POLL = 0.005


def _memcached(s: Settings, name: str = "memcached") -> Memcached:
    mc = s.fixtures.get(name)
    if mc is None:
        if shutil.which("memcached") is None:
            raise Skip("memcached not installed")
        mc = start_memcached(1)[0]
        s.fixtures[name] = mc
        s.cleanups.append(lambda: (_resume(mc), mc.stop()))
    return mc


def _resume(mc: Memcached) -> None:
    if mc.proc is not None and mc.proc.poll() is None:
        mc.proc.send_signal(signal.SIGCONT)


def pair(s: Settings, tickets: str, memcached: str = "memcached") -> list[Server]:
    """Two hosts with session_tickets = `tickets`, session_cache = memcache, the
    same certificate and [tls] session_key_file; each pair its own namespace
    (and, with `memcached` other than the default, its own memcached)."""
    name = f"pair-{tickets}" + ("" if memcached == "memcached" else f"-{memcached}")
    if name in s.fixtures:
        hosts: list[Server] = s.fixtures[name]
        for h in hosts:
            if h.proc is None or h.proc.poll() is not None:
                raise RuntimeError(f"host {h.dir.name} of {name} died: {h.logs()[-300:]}")
        return hosts
    assert s.base is not None and s.files is not None
    mc = _memcached(s, memcached)
    base = s.base / name
    base.mkdir(parents=True, exist_ok=True)
    key = base / "session.key"
    r = cli("key", "generate", "--out", str(key))
    if r.returncode != 0:
        raise RuntimeError(f"key generate: {r.stderr.strip()[-200:]}")
    tls = {"session_cache": "memcache", "session_tickets": tickets, "session_key_file": str(key),
           "require_data_session_reuse": False}  # fmt: skip
    memcache = {"enabled": True, "servers": [mc.address], "replicas": 1, "namespace": f"bench{tickets}"}
    hosts = []
    for i in range(2):
        tmp = base / f"h{i}"
        (tmp / "certs").mkdir(parents=True, exist_ok=True)
        shutil.copy(s.files.cert, tmp / "certs" / "cert.pem")  # one certificate for the cluster
        shutil.copy(s.files.key, tmp / "certs" / "key.pem")
        hosts.append(make_server(tmp, tls=dict(tls), memcache=dict(memcache), log={"level": "warning"},
                                 server={"max_sessions_per_node": MAX_SESSIONS, "idle_timeout": "600s",
                                         "login_timeout": "600s"}))  # fmt: skip
    s.fixtures[name] = hosts
    s.cleanups.append(lambda: [h.stop() for h in hosts])
    nodes = max(1, s.nodes // 2)  # the pair shares the machine the single peer had
    for h in hosts:
        h.start(nodes=nodes, wait=False)
    for h in hosts:
        wait_port(h.host, h.port, proc=h.proc, log=h.log)
    # Some churn on each: workers up, the password verified on every node.
    for h in hosts:
        loadgen.run(loadgen.sessions(h.host, h.port, h.user, h.password, 8, 0.3))
    return hosts


def _only_ftpcluster(peer: Peer, why_proftpd: str) -> None:
    if peer.name == "proftpd":
        raise Skip(why_proftpd)
    if peer.name != "ftpcluster":
        raise Skip(f"{peer.name} has no cluster" if peer.name != "pyftpdlib" else "pyftpdlib has no bans or cluster")


def _pick(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))] if ys else 0.0


def ban_propagation(peer: Peer, s: Settings) -> Sample:
    """Seconds from a ban on host A (control socket) until host B answers a
    connection from that address with 530; polled every 5 ms, bounded 5 s.
    Bans are made one by one after a random pause of up to one sync interval:
    issued right after the previous one was seen, they would all land just
    after a sync and every latency would be a full interval."""
    _only_ftpcluster(peer, "ProFTPD cannot propagate manual bans: an ftpdctl ban stays in that host's BanTable "
                           "(mod_ban's memcache BanCache carries only BanOnEvent bans)")  # fmt: skip
    a, b = pair(s, "cluster")
    cfg = config_mod.load(str(a.config))
    run = s.fixtures["banprop_runs"] = s.fixtures.get("banprop_runs", 0) + 1
    subnet = f"127.0.{3 + run}"  # 127.0.4.x on the first run; a fresh /24 per run (earlier bans are in force)
    n = 20 if s.quick else 100
    lat: list[float] = []
    calls: list[float] = []
    lost = polls = 0
    rnd = random.Random(run)
    for i in range(1, n + 1):
        ip = f"{subnet}.{i}"
        time.sleep(rnd.uniform(0, cfg.memcache.sync_interval))
        t0 = time.monotonic()
        reply = call(cfg, {"cmd": "ban", "kind": "host", "name": ip, "duration": 3600, "reason": "bench"})
        calls.append(time.monotonic() - t0)
        if not reply.get("ok"):
            raise RuntimeError(f"ban {ip} on host A: {reply.get('error')}")
        while True:
            polls += 1
            if _first_line(b.host, b.port, ip, timeout=1.0).startswith(b"530"):
                lat.append(time.monotonic() - t0)
                break
            if time.monotonic() - t0 > BAN_TIMEOUT:
                lost += 1
                lat.append(BAN_TIMEOUT)  # counted at the bound: a lost ban must not flatter p99
                break
            time.sleep(POLL)
    return Sample(_pick(lat, 0.99), {"bans": n, "lost": lost, "p50_s": round(_pick(lat, 0.5), 4),
                                      "p99_s": round(_pick(lat, 0.99), 4), "max_s": round(max(lat), 4),
                                      "ban_call_p50_ms": round(_pick(calls, 0.5) * 1000, 2), "polls": polls,
                                      "addresses": f"{subnet}.1-{n}"})  # fmt: skip


def _alternating(hosts: list[Server], s: Settings, ctx: ssl.SSLContext) -> tuple[loadgen.Result, float, float]:
    ends = [(h.host, h.port) for h in hosts]
    h0 = hosts[0]
    loadgen.run(loadgen.sessions(h0.host, h0.port, h0.user, h0.password, s.concurrency, s.warmup, tls=ctx,
                                 resume=True, endpoints=ends))  # fmt: skip
    srv0, cli0 = sum(cpu_seconds(h.proc.pid) for h in hosts if h.proc), self_cpu_seconds()
    duration = min(s.duration, 2.0) if s.quick else s.duration  # two variants a run: keep quick mode quick
    r = loadgen.run(loadgen.sessions(h0.host, h0.port, h0.user, h0.password, s.concurrency, duration, tls=ctx,
                                     resume=True, endpoints=ends))  # fmt: skip
    srv = sum(cpu_seconds(h.proc.pid) for h in hosts if h.proc) - srv0
    return r, srv, self_cpu_seconds() - cli0


def ftps_cross_host(peer: Peer, s: Settings) -> Sample:
    """FTPS sessions/s alternating between two hosts, each offering the previous
    connection's session: cluster tickets (TLS 1.3), then the memcached session
    cache with tickets off (TLS 1.2, session ids)."""
    _only_ftpcluster(peer, "ProFTPD's cross-host resumption is not set up in this bench (one host)")
    detail: dict[str, Any] = {}
    value = 0.0
    for tickets, maxv in (("cluster", None), ("off", ssl.TLSVersion.TLSv1_2)):
        hosts = pair(s, tickets)
        ctx = loadgen.client_context()
        if maxv is not None:
            ctx.maximum_version = maxv
        r, srv, cli_cpu = _alternating(hosts, s, ctx)
        if r.ops == 0:
            raise RuntimeError(f"tickets={tickets}: no session completed ({r.errors} errors)")
        ratio = r.resumed / r.offered if r.offered else 0.0
        tag = "" if tickets == "cluster" else "off_"
        detail.update({f"{tag}rate": round(r.rate, 1), f"{tag}ops": r.ops, f"{tag}errors": r.errors,
                       f"{tag}resumed_pct": round(100 * ratio, 1), f"{tag}p50_ms": round(r.p(0.5) * 1000, 2),
                       f"{tag}p99_ms": round(r.p(0.99) * 1000, 2),
                       f"{tag}server_cpu_ms_per_op": round(srv * 1000 / r.ops, 3),
                       f"{tag}client_cpu": round(cli_cpu / r.seconds, 2) if r.seconds else None})  # fmt: skip
        if tickets == "cluster":
            value = r.rate
    return Sample(value, detail)


def ftps_memcached_hung(peer: Peer, s: Settings) -> Sample:
    """FTPS sessions/s alternating between two hosts with tickets off (TLS 1.2:
    a session from the other host resumes through memcached), first with
    memcached healthy, then SIGSTOPped (same run); the value is the hung rate.
    A hung cache must cost full handshakes, not stalls."""
    _only_ftpcluster(peer, "ProFTPD's cross-host resumption is not set up in this bench (one host)")
    hosts = pair(s, "off", memcached="memcached-hung")
    mc = s.fixtures["memcached-hung"]
    cfg = config_mod.load(str(hosts[0].config))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a previous run's SIGSTOP is over: every server up again
        if all(x.get("up") for x in call(cfg, {"cmd": "status"}).get("memcache", {}).get("servers", [])):
            break
        time.sleep(0.1)
    ctx = loadgen.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    detail: dict[str, Any] = {}
    rates = {}
    for phase in ("healthy", "hung"):
        if phase == "hung":
            mc.proc.send_signal(signal.SIGSTOP)
        try:
            r, srv, _ = _alternating(hosts, s, ctx)
        finally:
            _resume(mc)
        if r.ops == 0:
            raise RuntimeError(f"memcached {phase}: no session completed ({r.errors} errors)")
        rates[phase] = r.rate
        detail.update({f"{phase}_rate": round(r.rate, 1), f"{phase}_errors": r.errors,
                       f"{phase}_resumed_pct": round(100 * r.resumed / r.offered, 1) if r.offered else 0.0,
                       f"{phase}_p50_ms": round(r.p(0.5) * 1000, 2), f"{phase}_p99_ms": round(r.p(0.99) * 1000, 2),
                       f"{phase}_max_ms": round(max(r.latencies) * 1000, 1) if r.latencies else None,
                       f"{phase}_server_cpu_ms_per_op": round(srv * 1000 / r.ops, 3)})  # fmt: skip
    detail["hung_vs_healthy_pct"] = round(100 * rates["hung"] / rates["healthy"], 1) if rates["healthy"] else None
    return Sample(rates["hung"], detail)
