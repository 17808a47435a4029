"""Two FTP hosts, memcached and a real haproxy, each on its own network (namespaces
joined by a private bridge when root; loopback aliases otherwise). Through the
balancer: plain and FTPS sessions with transfers reach both hosts with the real
client address, a ban made on one host refuses the client on both, a TLS session
resumes when the balancer moves the client to the other host, and a host cut off
from the network is routed around (namespaces only).

FTPCLUSTER_MULTIHOST=auto (default: namespaces if possible, else loopback), netns,
loopback or both."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from .support_cluster import wait_for
from .support_netns import ADDRESSES, ClientRunner, LBHost, Proc, Topology, clean_leftovers, haproxy_command, haproxy_config, netns_unavailable
from .support_server import PASSWORD, Server, cli, free_port, have, make_server, passive_range

pytestmark = pytest.mark.slow  # multi-host: `make test` runs it, -m "not slow" leaves it out

REPO = Path(__file__).resolve().parent.parent
CHOICE = os.environ.get("FTPCLUSTER_MULTIHOST", "auto")
_NETNS_WHY: list[str | None] = []


def netns_why() -> str | None:
    if not _NETNS_WHY:
        _NETNS_WHY.append(netns_unavailable())
    return _NETNS_WHY[0]


@dataclass
class Host:
    index: int
    addr: str
    srv: Server
    proc: Proc
    lb: LBHost
    pids: set[int] = field(default_factory=set)


@dataclass
class Cluster:
    mode: str
    lb: str
    control_port: int
    implicit_port: int
    hosts: list[Host]
    client: ClientRunner
    client_prefix: list[str]
    stats: Path
    topo: Topology | None
    sticky: dict[int, list[str]] = field(default_factory=dict)

    def host(self, i: int) -> Host:
        return self.hosts[i - 1]

    def port(self, mode: str) -> int:
        return self.implicit_port if mode == "implicit" else self.control_port

    def row(self, i: int) -> dict[str, str]:
        text = haproxy_command(self.stats, "show stat").lstrip("# ")
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] == "ftp_control" and row["svname"] == f"ftp-{i}":
                return row
        raise AssertionError(f"no ftp_control/ftp-{i} in haproxy stats")

    def wait_status(self, i: int, status: str, timeout: float = 20) -> float:
        """Until haproxy shows ftp_control/ftp-i in `status` (UP needs a passing check)."""

        def ok() -> bool:
            r = self.row(i)
            return r["status"] == status and (status != "UP" or r["check_status"] == "L7OK")

        wait_for(ok, timeout=timeout, what=f"ftp-{i} {status} in haproxy")
        return time.time()

    def set_state(self, i: int, state: str) -> None:
        out = haproxy_command(self.stats, f"set server ftp_control/ftp-{i} state {state}")
        assert out.strip() == "", out

    def which(self, text: str) -> int | None:
        """The host that wrote `text`: its banner, or a node pid in a STAT reply."""
        m = re.search(r"host(\d) ready", text)
        if m:
            return int(m.group(1))
        m = re.search(r"Session \d+-(\d+)-\d+", text)
        if m:
            for h in self.hosts:
                if int(m.group(1)) in h.pids:
                    return h.index
        return None

    def s_client(self, kind: str, version: str, source: str, extra: list[str]) -> str:
        cmd = [*self.client_prefix, "openssl", "s_client", f"-{version}", "-ign_eof", "-bind", f"{source}:0",
               "-connect", f"{self.lb}:{self.port(kind)}", *extra]  # fmt: skip
        if kind == "explicit":
            cmd += ["-starttls", "ftp"]
        r = subprocess.run(cmd, input="STAT\r\nQUIT\r\n", capture_output=True, text=True, timeout=30, cwd=str(REPO))
        return r.stdout + r.stderr


def _status(cfg: Path) -> dict[str, Any] | None:
    r = cli("status", "--json", config=cfg, timeout=20)
    return json.loads(r.stdout) if r.returncode == 0 else None


def _wait_host(h: Host, nodes: int) -> None:
    def ready() -> dict[str, Any] | None:
        if not h.proc.alive():
            raise RuntimeError(f"host{h.index} exited:\n{h.proc.tail()}")
        st = _status(h.srv.config)
        ok = st and len(st["nodes"]) == nodes and all(n.get("state", "accepting") == "accepting" for n in st["nodes"])
        return st if ok else None

    st = wait_for(ready, timeout=40, what=f"host{h.index} nodes accepting")
    h.pids = {n["pid"] for n in st["nodes"]}


def quiet_range(host: str) -> tuple[int, int]:
    """A passive range below the ephemeral ports (outgoing connections, e.g. to
    memcached, take those from 127.0.0.1, where haproxy binds every passive port),
    free on the balancer's and the host's address right now, from this xdist worker's
    share (support_server.passive_range: no other worker's server gets a port of it)."""
    return passive_range(host=host, also=("127.0.0.1",))


def build(mode: str, tmp: Path, stack: contextlib.ExitStack, nodes: int = 2) -> Cluster:
    """Everything, registered on `stack` for teardown as soon as it exists."""
    topo: Topology | None = None
    if mode == "netns":
        clean_leftovers()
        topo = Topology(client_sources=32)
        stack.callback(topo.destroy)
        topo.build()
        pre = topo.exec_prefix
        lb, mc = ADDRESSES["lb"], f"{ADDRESSES['mc']}:11211"
        addrs = [ADDRESSES["ftp1"], ADDRESSES["ftp2"]]
        ctrl, imp = 21, 990
        host_ports = [(21, 990), (21, 990)]
        ranges = [(30000, 30031), (31000, 31031)]
        sources = topo.sources
        mproc = Proc("memcached", [*pre("mc"), "memcached", "-l", ADDRESSES["mc"], "-p", "11211", "-U", "0", "-m", "32", "-u", "nobody"], tmp / "memcached.log")
        stack.callback(mproc.stop)
        mproc.start()
        client_prefix = pre("client")
    else:
        from .support_memcached import Memcached

        lb = "127.0.0.1"
        addrs = ["127.0.0.2", "127.0.0.3"]
        ctrl, imp = free_port(lb), free_port(lb)
        host_ports = [(free_port(a), free_port(a)) for a in addrs]
        ranges = [quiet_range(addrs[0]), quiet_range(addrs[1])]
        sources = [f"127.0.0.{100 + i}" for i in range(32)]
        m = Memcached(free_port())
        stack.callback(m.stop)
        m.start()
        mc = m.address
        client_prefix = []

    key = tmp / "session.key"
    r = cli("key", "generate", "--out", str(key))
    assert r.returncode == 0, r.stderr
    hosts: list[Host] = []
    for i, addr in enumerate(addrs, start=1):
        cp, ip = host_ports[i - 1]
        lo, hi = ranges[i - 1]
        srv = make_server(
            tmp / f"host{i}",
            host=addr if mode == "loopback" else "127.0.0.1",
            tls={"session_cache": "memcache", "session_tickets": "cluster", "session_key_file": str(key)},
            server={"listen": f"{addr}:{cp}", "implicit_tls_listen": f"{addr}:{ip}", "passive_ports": f"{lo}-{hi}",
                    "masquerade_address": lb, "banner": f"host{i} ready"},
            memcache={"enabled": True, "servers": [mc], "timeout": "200ms", "connect_failures": 2, "probe_interval": "300ms"},
            proxy_protocol={"enabled": True, "trusted": [f"{lb}/32"], "passive": True},
        )  # fmt: skip
        srv.home.mkdir(parents=True, exist_ok=True)
        if i > 1:  # one certificate for the cluster
            for name in ("cert.pem", "key.pem"):
                shutil.copy(hosts[0].srv.dir / "certs" / name, srv.dir / "certs" / name)
        prefix = topo.exec_prefix(f"ftp{i}") if topo else []
        cmd = [*prefix, sys.executable, "-m", "ftpcluster.cli", "start", "--config", str(srv.config), "--nodes", str(nodes)]
        proc = Proc(f"host{i}", cmd, srv.dir / "server.log")
        stack.callback(proc.stop)
        proc.start()
        hosts.append(Host(i, addr, srv, proc, LBHost(i, addr, cp, ip, (lo, hi))))
    for h in hosts:
        _wait_host(h, nodes)

    lbdir = tmp / "lb"
    lbdir.mkdir()
    stats = lbdir / "haproxy.sock"
    cfg = lbdir / "haproxy.cfg"
    cfg.write_text(haproxy_config(lb, ctrl, imp, [h.lb for h in hosts], stats))
    hap = Proc("haproxy", [*(topo.exec_prefix("lb") if topo else []), "haproxy", "-db", "-f", str(cfg)], lbdir / "haproxy.log")
    stack.callback(hap.stop)
    hap.start()
    cluster = Cluster(mode, lb, ctrl, imp, hosts, ClientRunner(client_prefix), client_prefix, stats, topo)

    def stats_up() -> bool:
        if not hap.alive():
            raise RuntimeError(f"haproxy exited:\n{hap.tail()}")
        return stats.exists()

    wait_for(stats_up, timeout=15, what="haproxy stats socket")
    for h in hosts:
        cluster.wait_status(h.index, "UP")
    for h in hosts:  # both supervisors see memcached (bans and TLS sessions travel through it)
        wait_for(lambda h=h: (st := _status(h.srv.config)) and all(s["up"] for s in st["memcache"]["servers"]),
                 timeout=15, what=f"host{h.index} memcached up")  # fmt: skip

    # Which host each client address sticks to (balance source + stick table).
    banners = cluster.client("greet_many", host=lb, port=ctrl, sources=sources)
    for src, line in banners.items():
        which = cluster.which(line)
        assert which is not None, (src, line)
        cluster.sticky.setdefault(which, []).append(src)
    counts = {i: len(cluster.sticky.get(i, [])) for i in (1, 2)}
    assert min(counts.values()) >= 6, f"client addresses per host through the balancer: {counts}"
    return cluster


@pytest.fixture(scope="module", params=["netns", "loopback"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    mode = request.param
    for tool in ("haproxy", "memcached", "openssl"):
        if not have(tool):
            pytest.skip(f"{tool} is not installed")
    why = netns_why()
    if mode == "netns" and (why or CHOICE == "loopback"):
        pytest.skip(f"network namespaces unavailable ({why}); the loopback variant runs instead" if why else "FTPCLUSTER_MULTIHOST=loopback")
    if mode == "loopback" and why is None and CHOICE not in ("loopback", "both"):
        pytest.skip("network namespaces work here, so the netns variant runs (FTPCLUSTER_MULTIHOST=both runs this too)")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        c = build(mode, tmp_path_factory.mktemp(f"multihost-{mode}"), stack)
        print(f"\n[{mode}] topology up in {time.monotonic() - started:.1f}s; sticky {[(i, len(v)) for i, v in sorted(c.sticky.items())]}")
        yield c


# ------------------------------------------------------------------ (1) sessions
def test_plain_and_ftps_sessions_and_transfers_reach_both_hosts(cluster: Cluster) -> None:
    for i in (1, 2):
        src = cluster.sticky[i][0]
        h = cluster.host(i)
        for mode in ("plain", "explicit", "implicit"):
            r = cluster.client("session", host=cluster.lb, port=cluster.port(mode), source=src, mode=mode,
                               transfer=256 * 1024, password=PASSWORD)  # fmt: skip
            assert r["ok"], (r["error"], r)  # the error first: pytest truncates the dict
            assert f"host{i} ready" in r["banner"], r
            assert f"Connected from {src}" in r["stat"], r  # the PROXY header's address, not the balancer's
            assert r["sent"] == r["back"], r
            assert (h.srv.home / r["name"]).stat().st_size == 256 * 1024  # stored on that host
            # PASV named the balancer and a port of this host's range (its passive frontend).
            assert r["pasv_hosts"] and all(ph == cluster.lb and h.lb.passive[0] <= pp <= h.lb.passive[1] for ph, pp in r["pasv_hosts"]), r
            if mode != "plain":
                assert "Control channel: TLS; data: private" in r["stat"], r


# ------------------------------------------------------------------ (2) bans
def test_ban_on_one_host_refuses_the_client_on_both(cluster: Cluster) -> None:
    banned = [cluster.sticky[1][1], cluster.sticky[2][1]]  # one lands on each host through the balancer
    fine = {i: cluster.sticky[i][2] for i in (1, 2)}
    before = cluster.client("greet_many", host=cluster.lb, port=cluster.control_port, sources=banned)
    assert all(v.startswith("220") for v in before.values()), before
    h1, h2 = cluster.host(1), cluster.host(2)
    t0 = time.monotonic()
    try:
        for ip in banned:
            r = cli("ban", "host", ip, "--for", "10m", "--reason", "multihost", config=h1.srv.config)
            assert r.returncode == 0 and r.stdout == f"banned host {ip} for 10m on 2 hosts\n", r.stdout + r.stderr

        def refused() -> dict[str, str] | None:
            got = cluster.client("greet_many", host=cluster.lb, port=cluster.control_port, sources=banned)
            return got if all(v.startswith("530") for v in got.values()) else None

        wait_for(refused, timeout=10, what="both banned addresses refused through the balancer")
        print(f"\n[{cluster.mode}] ban on host1 refused on both hosts through haproxy after {time.monotonic() - t0:.2f}s")
        # Directly on each host too (no PROXY from an untrusted peer: its own address counts).
        for h in (h1, h2):
            for ip in banned:
                line = cluster.client("greet", host=h.addr, port=h.lb.control_port, source=ip)
                assert line.startswith("530"), (h.index, ip, line)
        for i, src in fine.items():
            r = cluster.client("session", host=cluster.lb, port=cluster.control_port, source=src, password=PASSWORD)
            assert r["ok"] and f"host{i} ready" in r["banner"], r
    finally:
        for ip in banned:  # a permit on the other host lifts it everywhere
            cli("permit", "host", ip, config=h2.srv.config)

    def admitted() -> bool:
        got = cluster.client("greet_many", host=cluster.lb, port=cluster.control_port, sources=banned)
        return all(v.startswith("220") for v in got.values())

    wait_for(admitted, timeout=10, what="permits lifted on both hosts")


# ------------------------------------------------------------------ (3) TLS resumption
VARIANTS = [
    ("implicit", "tls1_3", []),
    ("explicit", "tls1_3", []),
    ("implicit", "tls1_2", []),
    ("explicit", "tls1_2", ["-no_ticket"]),  # a session id: the sealed memcached store
]


@pytest.mark.parametrize("kind,version,extra", VARIANTS, ids=[f"{k}-{v}{'-noticket' if e else ''}" for k, v, e in VARIANTS])
def test_tls_session_resumes_when_the_balancer_moves_the_client(cluster: Cluster, tmp_path: Path, kind: str, version: str, extra: list[str]) -> None:
    src = cluster.sticky[1][3]
    sess = tmp_path / "session.pem"
    first = cluster.s_client(kind, version, src, ["-sess_out", str(sess), *extra])
    assert "\nNew, TLSv1." in first and "211" in first, first[-2000:]
    a = cluster.which(first)
    assert a in (1, 2), first[-2000:]
    b = 3 - a
    cluster.set_state(a, "maint")  # the balancer moves the client: draining host a
    try:
        second = cluster.s_client(kind, version, src, ["-sess_in", str(sess), *extra])
        assert cluster.which(second) == b, second[-2000:]
        assert "\nReused, TLSv1." in second, second[-2000:]
        assert f"Connected from {src}" in second and "Control channel: TLS" in second, second[-2000:]
    finally:
        cluster.set_state(a, "ready")
        cluster.wait_status(a, "UP")


# ------------------------------------------------------------------ (4) the walkthrough's check
def test_cluster_check_passes_against_the_topology(cluster: Cluster) -> None:
    """deploy/README.md's last step, `ftpcluster cluster check`, run on host 1 as an
    operator would: memcached, both hosts and their key, ban propagation, TLS
    resumption through the balancer."""
    h1 = cluster.host(1)
    prefix = cluster.topo.exec_prefix("ftp1") if cluster.topo else []
    cmd = [*prefix, sys.executable, "-m", "ftpcluster.cli", "cluster", "check", "--config", str(h1.srv.config),
           "--balancer", f"{cluster.lb}:{cluster.control_port}", "--expect-hosts", "2", "--source", h1.addr, "--json"]  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=str(REPO))
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"checks": [], "raw": r.stdout + r.stderr}
    failed = [c for c in report["checks"] if not c["ok"]]
    assert r.returncode == 0 and report.get("ok"), (failed, report)
    names = [c["check"] for c in report["checks"]]
    assert sum(n.startswith("ban propagation to ") for n in names) == 2, names
    assert sum(n.startswith("TLS resumption on ") for n in names) == 3, names  # both hosts and the balancer
    print(f"\n[{cluster.mode}] cluster check passed in {time.monotonic() - t0:.1f}s: " + "; ".join(f"{c['check']}: {c['detail']}" for c in report["checks"]))


# ------------------------------------------------------------------ (5) a host cut off
def test_host_cut_off_is_routed_around(cluster: Cluster, record_property: Any) -> None:
    if cluster.topo is None:
        pytest.skip("cutting a host off the network needs network namespaces")
    s1, s2, hold = cluster.sticky[1][4], cluster.sticky[2][4], cluster.sticky[1][5]
    duration = 7.0
    result = cluster.client.background("probe", host=cluster.lb, port=cluster.control_port, sources=[s1, s2], hold=hold,
                                       duration=duration, interval=0.25, timeout=8, password=PASSWORD)  # fmt: skip
    collected: list[dict[str, Any]] = []
    time.sleep(1.5)  # a baseline with both hosts up
    t_cut = time.time()
    cluster.topo.set_link("ftp1", False)
    try:
        t_down = cluster.wait_status(1, "DOWN", timeout=20)
        res = result()
        collected.append(res)
        logins = res["logins"]
        # Every login that started once haproxy had marked host 1 down went to host 2...
        after = [r for r in logins if r["source"] == s1 and r["t0"] > t_down]
        assert all(r["ok"] and "host2 ready" in r["banner"] for r in after), after
        for size in (0, 0, 64 * 1024):  # ...as do the next ones, with a transfer over host 2's passive range
            r = cluster.client("session", host=cluster.lb, port=cluster.control_port, source=s1, transfer=size, password=PASSWORD)
            assert r["ok"] and "host2 ready" in r["banner"], r
            assert not size or r["sent"] == r["back"], r
        # and host 2's own clients never noticed.
        assert all(r["ok"] and "host2 ready" in r["banner"] for r in logins if r["source"] == s2), [r for r in logins if r["source"] == s2]
        # What a client saw (reported, never asserted: timings depend on the machine).
        window = [r for r in logins if r["source"] == s1 and t_cut <= r["t0"] + r["elapsed"] and r["t0"] <= t_down]
        summary = {
            "detect_s": round(t_down - t_cut, 2),
            "window_logins": [(round(r["t0"] - t_cut, 2), round(r["elapsed"], 2), r["ok"], r["banner"][:20] if r["ok"] else r["error"]) for r in window],
            "after_down": f"{sum(r['ok'] for r in after)}/{len(after)} ok, max {max((r['elapsed'] for r in after), default=0):.3f}s",
            "held_session": {k: (round(v - t_cut, 2) if isinstance(v, float) else v) for k, v in res["held"].items() if k != "banner"},
            "s2_max_latency_s": round(max(r["elapsed"] for r in logins if r["source"] == s2), 3),
        }
        record_property("host_failure", json.dumps(summary))
        print(f"\n[{cluster.mode}] host failure as a client saw it: {json.dumps(summary)}")
    finally:
        cluster.topo.set_link("ftp1", True)
        if not collected:  # the probe is bounded; do not leave it running
            with contextlib.suppress(Exception):
                result()
        with contextlib.suppress(AssertionError):
            cluster.wait_status(1, "UP", timeout=10)
