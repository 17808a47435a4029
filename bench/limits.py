"""Transfer-limit workloads, ftpcluster only, on a two-host pair sharing one
memcached and the users' homes (Settings.fixtures, started on first use):

- retr_limit_idle: RETR of the big file by a user whose cluster-wide download
  rate is configured far above what loopback moves (so it never bites),
  against the same RETR by a user without any limit, interleaved in one run:
  the limited path keeps sendfile, so the two should not differ.
- rate_error: three sessions of one user over the two hosts against a 4 MiB/s
  cluster-wide limit; the figure is how far the total went over (negative:
  under), measured as bytes / wall time at the client.
- quota_drift: 1,000 uploads and deletes of random sizes spread over both
  hosts by four clients at once; then the usage in memcached is compared with
  a scan of the home (the truth). The figure is the byte error."""

from __future__ import annotations

import ftplib
import io
import json
import os
import random
import threading
import time
from pathlib import Path

from tests.support_server import PASSWORD, Server, cli, make_server, wait_port

from .cluster import _memcached
from .peers import Peer
from .workloads import MiB, Sample, Settings, Skip, _curl

LIMIT_RATE = 4 * MiB
QUOTA_OPS = 1000


def limits_pair(s: Settings) -> list[Server]:
    """Two hosts; users alice (no limit), fast (100 GiB/s: never hit), slow
    (LIMIT_RATE down) and carol (a 1 GiB quota), homes shared by both hosts."""
    hosts = s.fixtures.get("limits-pair")
    if hosts is not None:
        return hosts
    from ftpcluster.users import UserRecord, hash_password, load_users, save_users

    assert s.base is not None and s.files is not None
    mc = _memcached(s)
    base = s.base / "limits-pair"
    memcache = {"enabled": True, "servers": [mc.address], "namespace": "benchlimits"}
    hosts = [make_server(base / f"h{i}", memcache=dict(memcache), log={"level": "warning"}) for i in range(2)]
    users = load_users(hosts[0].dir / "users.toml")
    pw = hash_password(PASSWORD)
    own = {"fast": (("download_rate", "100G"),), "slow": (("download_rate", str(LIMIT_RATE)),),
           "carol": (("quota_bytes", "1G"),)}  # fmt: skip
    for name, limits in own.items():
        home = base / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        users[name] = UserRecord(name, pw, str(home), False, "", limits)
    save_users(hosts[0].dir / "users.toml", users)
    (hosts[1].dir / "users.toml").write_text((hosts[0].dir / "users.toml").read_text())
    for name in ("alice", "fast"):
        home = hosts[0].home if name == "alice" else base / "homes" / name
        dst = home / s.files.big.name
        if not dst.exists():
            os.link(s.files.big, dst)
    (base / "homes" / "slow" / "rate.bin").write_bytes(os.urandom(4 * MiB))
    s.fixtures["limits-pair"] = hosts
    s.cleanups.append(lambda: [h.stop() for h in hosts])
    for h in hosts:
        h.start(nodes=max(1, s.nodes // 2), wait=False)
    for h in hosts:
        wait_port(h.host, h.port, proc=h.proc, log=h.log)
    return hosts


def _only_ftpcluster(peer: Peer) -> None:
    if peer.name != "ftpcluster":
        raise Skip(f"{peer.name}: no cluster-wide limits to compare")


def retr_limit_idle(peer: Peer, s: Settings) -> Sample:
    _only_ftpcluster(peer)
    a = limits_pair(s)[0]
    assert s.files is not None
    name = s.files.big.name
    url = lambda user: f"ftp://{user}:{PASSWORD}@{a.host}:{a.port}/{name}"  # noqa: E731
    limited, plain = [], []
    for _ in range(3):  # interleaved: drift on a shared machine hits both
        plain.append(_curl(["-o", "/dev/null", url("alice")], "download").value)
        limited.append(_curl(["-o", "/dev/null", url("fast")], "download").value)
    lim, unl = sorted(limited)[1], sorted(plain)[1]
    return Sample(lim, {"unlimited_mib_s": round(unl, 1), "difference_pct": round((lim / unl - 1) * 100, 1),
                        "runs_limited": [round(x) for x in limited], "runs_unlimited": [round(x) for x in plain]},
                  note="retr_limit_idle: the same host, file and client; user `fast` has a 100 GiB/s cluster-wide "
                       "download rate (leased from memcached), `alice` none")  # fmt: skip


def _login(srv: Server, user: str) -> ftplib.FTP:
    f = ftplib.FTP(timeout=30)
    f.connect(srv.host, srv.port)
    f.login(user, PASSWORD)
    return f


def rate_error(peer: Peer, s: Settings) -> Sample:
    _only_ftpcluster(peer)
    a, b = limits_pair(s)
    conns = [_login(h, "slow") for h in (a, a, b)]  # logged in first: the figure is the data phase
    got: list[int] = []
    start = threading.Barrier(len(conns) + 1)

    def one(f: ftplib.FTP) -> None:
        out = io.BytesIO()
        start.wait(30)
        f.retrbinary("RETR rate.bin", out.write, blocksize=1 << 20)
        got.append(out.tell())

    threads = [threading.Thread(target=one, args=(f,)) for f in conns]
    for t in threads:
        t.start()
    start.wait(30)
    t0 = time.monotonic()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0
    for f in conns:
        f.close()
    rate = sum(got) / elapsed
    return Sample((rate / LIMIT_RATE - 1) * 100, {"bytes": sum(got), "seconds": round(elapsed, 2),
                                                   "limit_mib_s": LIMIT_RATE / MiB, "mib_s": round(rate / MiB, 3)},
                  note="rate_error: 3 sessions (2 on host A, 1 on host B) of one user, 4 MiB/s cluster-wide, "
                       "logged in first; bytes / wall time at the client from the RETRs to the last byte")  # fmt: skip


def quota_drift(peer: Peer, s: Settings) -> Sample:
    _only_ftpcluster(peer)
    hosts = limits_pair(s)
    from ftpcluster.cluster.quota_store import scan_home

    home = Path(hosts[0].dir.parent / "homes" / "carol")
    run = s.fixtures["quota_runs"] = s.fixtures.get("quota_runs", 0) + 1
    lock = threading.Lock()
    names: list[str] = []
    ops = {"upload": 0, "delete": 0, "refused": 0}
    rng = random.Random(run)

    def client(k: int) -> None:
        conns = [_login(h, "carol") for h in hosts]
        try:
            for i in range(QUOTA_OPS // 4):
                f = conns[rng.randrange(2)]
                with lock:
                    victim = names.pop(rng.randrange(len(names))) if names and rng.random() < 0.4 else None
                if victim is not None:
                    f.delete(victim)
                    with lock:
                        ops["delete"] += 1
                    continue
                name = f"r{run}-{k}-{i}.bin"
                try:
                    f.storbinary(f"STOR {name}", io.BytesIO(os.urandom(rng.randrange(1, 64 << 10))))
                except ftplib.error_perm:
                    with lock:
                        ops["refused"] += 1
                    continue
                with lock:
                    names.append(name)
                    ops["upload"] += 1
        finally:
            for f in conns:
                f.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - t0
    time.sleep(1.0)  # the last settlements are asynchronous
    truth_b, truth_f = scan_home(str(home))
    r = cli("quota", "show", "carol", "--json", config=hosts[1].config)
    shown = json.loads(r.stdout)
    err_b, err_f = shown["used_bytes"] - truth_b, shown["used_files"] - truth_f
    return Sample(abs(err_b), {"error_bytes": err_b, "error_files": err_f, "used_bytes": truth_b,
                               "used_files": truth_f, "source": shown["source"], "ops": ops,
                               "seconds": round(elapsed, 1)},
                  note=f"quota_drift: {QUOTA_OPS} uploads (1 B-64 KiB) and deletes by 4 clients over 2 hosts; "
                       "memcached's usage against a scan of the home")  # fmt: skip
