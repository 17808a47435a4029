"""The supervisor with real processes and signals: respawn, no orphans, reload under
load, graceful stop, scaling, daemon start, control socket, status."""

from __future__ import annotations

import ftplib
import hashlib
import io
import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from .support_cluster import alive, node_pids, ready_status, session_pid, sessions_on_every_node, status, wait_for
from .support_server import FTPCLUSTER, REPO, cli, make_server, require

BIG = 48 * 1024 * 1024


def _big_file(srv, name: str = "big.bin") -> str:
    srv.home.mkdir(parents=True, exist_ok=True)
    path = srv.home / name
    with open(path, "wb") as f:
        block = os.urandom(1024 * 1024)
        for _ in range(BIG // len(block)):
            f.write(block)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _slow_download(f: ftplib.FTP, name: str, started: threading.Event, pause: float = 0.002,
                   go: threading.Event | None = None) -> str:
    """RETR reading slowly, so the transfer is surely running when the test acts; with
    `go`, it also stops reading after the first chunk until the test has acted."""
    h = hashlib.sha256()
    f.voidcmd("TYPE I")
    with f.transfercmd(f"RETR {name}") as conn:
        conn.settimeout(30)
        h.update(conn.recv(65536))
        started.set()
        if go is not None:
            assert go.wait(30)
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            h.update(chunk)
            time.sleep(pause)
    f.voidresp()
    return h.hexdigest()


def test_status_json_and_passive_slices(server_factory):
    srv = server_factory(nodes=3)
    st = ready_status(srv, 3)
    assert st["supervisor_pid"] == srv.proc.pid
    assert st["listen"] == [f"127.0.0.1:{srv.port}"]
    assert isinstance(st["memcache"]["servers"], list)
    assert sorted(n["id"] for n in st["nodes"]) == [1, 2, 3]
    slices = sorted(tuple(map(int, n["passive"].split("-"))) for n in st["nodes"])
    lo, hi = srv.passive
    assert slices[0][0] == lo and slices[-1][1] == hi
    for (a, b), (c, _) in zip(slices, slices[1:]):
        assert a <= b < c  # disjoint and ordered
    # A session's passive port comes from its own node's slice.
    f = srv.ftp()
    pid = session_pid(f)
    node = next(n for n in st["nodes"] if n["pid"] == pid)
    a, b = map(int, node["passive"].split("-"))
    for _ in range(5):
        host, port = ftplib.parse227(f.sendcmd("PASV"))
        assert a <= port <= b
    f.quit()
    text = cli("status", config=srv.config)
    assert text.returncode == 0 and str(srv.proc.pid) in text.stdout
    as_json = cli("status", "--json", config=srv.config)  # the helpers ask the socket in-process
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["supervisor_pid"] == srv.proc.pid


def test_control_socket_is_owner_only(server):
    sock = server.dir / "state" / "control.sock"
    mode = stat.S_IMODE(os.stat(sock).st_mode)
    assert mode & 0o077 == 0


def test_status_without_supervisor_fails_clearly(tmp_path):
    srv = make_server(tmp_path / "idle")
    r = cli("status", config=srv.config)
    assert r.returncode == 1
    assert "no supervisor running" in r.stderr and r.stderr.count("\n") == 1


def test_kill_node_mid_transfer(server_factory):
    srv = server_factory(nodes=3)
    _big_file(srv)
    by_pid = sessions_on_every_node(srv, 1)
    victim_pid = next(iter(by_pid))
    victim = by_pid[victim_pid][0]
    victim_id = next(i for i, p in node_pids(srv).items() if p == victim_pid)
    started, killed = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def download() -> None:
        try:
            outcome["digest"] = _slow_download(victim, "big.bin", started, go=killed)
        except Exception as e:  # expected: the node dies under it
            outcome["error"] = e

    t = threading.Thread(target=download)
    t.start()
    assert started.wait(10)
    os.kill(victim_pid, signal.SIGKILL)  # the download holds after its first chunk: surely mid-transfer
    killed.set()
    t.join(30)
    assert "error" in outcome, outcome
    # Every other session carries on.
    for pid, sessions in by_pid.items():
        if pid != victim_pid:
            for f in sessions:
                assert f.voidcmd("NOOP").startswith("200")
    # The node is replaced, under the same id.
    wait_for(lambda: node_pids(srv).get(victim_id) not in (None, victim_pid), what="replacement node")
    assert status(srv)["restarts"] >= 1
    srv.ftp().quit()


def test_kill_supervisor_leaves_no_orphans(server_factory):
    srv = server_factory(nodes=3)
    pids = list(node_pids(srv).values())
    assert len(pids) == 3
    f = srv.ftp()  # a live session must not keep its node alive
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    wait_for(lambda: not any(alive(p) for p in pids), timeout=10, what="nodes to exit")
    f.close()


def test_term_lets_running_transfer_finish(server_factory):
    srv = server_factory(nodes=2)
    digest = _big_file(srv)
    f = srv.ftp()
    idle = srv.ftp()
    started = threading.Event()
    result: dict[str, object] = {}

    def download() -> None:
        try:
            result["digest"] = _slow_download(f, "big.bin", started, pause=0.004)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=download)
    t.start()
    assert started.wait(10)
    os.kill(srv.proc.pid, signal.SIGTERM)
    # New connections are no longer accepted once every node stopped accepting.
    t.join(60)
    assert result.get("digest") == digest, result
    with pytest.raises((ftplib.Error, OSError, EOFError)):
        idle.voidcmd("NOOP")  # idle sessions are told 421 and closed
    assert srv.proc.wait(30) == 0


def test_hup_under_load_refuses_nothing_and_cuts_no_transfer(server_factory):
    srv = server_factory(nodes=2)
    digest = _big_file(srv)
    errors: list[BaseException] = []
    stop = threading.Event()
    logins = [0]

    def churn() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                g = srv.ftp()
                g.voidcmd("NOOP")
                g.quit()
                logins[0] += 1
            except BaseException as e:
                errors.append(e)
                return

    f = srv.ftp()
    started = threading.Event()
    result: dict[str, object] = {}

    def download() -> None:
        try:
            result["digest"] = _slow_download(f, "big.bin", started, pause=0.003)
        except Exception as e:
            result["error"] = e

    workers = [threading.Thread(target=churn) for _ in range(4)]
    for w in workers:
        w.start()
    t = threading.Thread(target=download)
    t.start()
    assert started.wait(10)
    before = set(node_pids(srv).values())
    os.kill(srv.proc.pid, signal.SIGHUP)
    wait_for(lambda: (p := set(node_pids(srv).values())) and not (p & before) and len(p) == 2, what="new generation")
    r = cli("reload", config=srv.config)  # the same through the control socket
    assert r.returncode == 0, r.stderr
    t.join(90)
    stop.set()
    for w in workers:
        w.join(30)
    assert not errors, errors[:3]
    assert result.get("digest") == digest, result
    assert logins[0] > 0
    assert status(srv)["generation"] == 3


def test_reload_with_broken_config_keeps_running(server_factory):
    srv = server_factory(nodes=1)
    pid = node_pids(srv)[1]
    users = srv.dir / "users.toml"
    good_users = users.read_text()
    users.write_text("[[users]\nbroken")
    r = cli("reload", config=srv.config)
    assert r.returncode == 1 and "reload refused" in r.stderr and "users file" in r.stderr
    users.write_text(good_users)
    good = srv.config.read_text()
    srv.config.write_text(good + "\n[server]\nbogus = 1\n")
    os.kill(srv.proc.pid, signal.SIGHUP)
    wait_for(lambda: srv.logs().count("reload refused") >= 2, what="the second refusal in the log")
    srv.config.write_text(good)
    assert status(srv)["generation"] == 1 and node_pids(srv)[1] == pid
    srv.ftp().quit()


def test_ttin_ttou(server_factory):
    srv = server_factory(nodes=2)
    os.kill(srv.proc.pid, signal.SIGTTIN)
    wait_for(lambda: len(node_pids(srv)) == 3, what="a third node")
    os.kill(srv.proc.pid, signal.SIGTTOU)  # one at a time: a pending signal sent twice arrives once
    wait_for(lambda: len(status(srv)["nodes"]) == 2, what="two nodes left")
    os.kill(srv.proc.pid, signal.SIGTTOU)
    wait_for(lambda: len(status(srv)["nodes"]) == 1, what="one node left")
    assert status(srv)["target_nodes"] == 1
    srv.ftp().quit()


def test_stop_past_its_timeout_ends_transfers_as_aborts(server_factory):
    """A transfer still running when `stop --timeout` runs out: the node stops its
    sessions itself (421), the upload ends as an abort (its xferlog `i` line, with
    the bytes it got, and no partial file left), and nothing is SIGKILLed."""
    from ftpcluster.worker.fs import TEMP_PREFIX

    srv = server_factory(nodes=1, log={"xferlog": "xfer.log"})
    srv.home.mkdir(parents=True, exist_ok=True)
    with open(srv.home / "big.bin", "wb") as fh:
        fh.truncate(64 << 20)  # sparse: sent from a thread in blocks far larger than what is read
    d = srv.ftp()
    d.voidcmd("TYPE I")
    down = d.transfercmd("RETR big.bin")
    got = 0
    while got < 1 << 20:  # 1 MB, then the reader stalls
        got += len(down.recv(65536))
    f = srv.ftp()
    f.voidcmd("TYPE I")
    conn = f.transfercmd("STOR slow.bin")
    conn.sendall(b"s" * 100_000)  # then nothing more: the upload never ends by itself
    assert wait_for(lambda: any(p.name.startswith(TEMP_PREFIX) for p in srv.home.iterdir()), what="the upload's temp file")
    r = cli("stop", "--timeout", "1s", config=srv.config)
    assert r.returncode == 0, r.stderr
    assert srv.proc.wait(20) == 0
    f.sock.settimeout(10)
    assert f.getline().startswith("421"), "the client was not told"
    conn.close()
    f.close()
    assert not [p.name for p in srv.home.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert not (srv.home / "slow.bin").exists()
    lines = {ln.split()[8]: ln.split() for ln in (srv.dir / "xfer.log").read_text().splitlines()}  # by file name
    up, dn = lines[str(srv.home / "slow.bin")], lines[str(srv.home / "big.bin")]
    assert up[-1] == "i" and int(up[7]) == 100_000, up  # status incomplete, bytes received
    # The download's bytes: at least what the client read (its block never returned).
    assert dn[-1] == "i" and got <= int(dn[7]) < 64 << 20, dn
    down.close()
    d.close()
    assert "stopping its sessions now" in srv.logs() and "killing it" not in srv.logs()


def test_stop_command_waits_for_the_end(server_factory):
    srv = server_factory(nodes=2)
    pids = list(node_pids(srv).values())
    r = cli("stop", "--timeout", "10s", config=srv.config)
    assert r.returncode == 0, r.stderr
    assert srv.proc.wait(10) == 0
    assert not any(alive(p) for p in pids)


def _daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env


def test_daemon_start_and_failures(tmp_path):
    srv = make_server(tmp_path / "d")
    r = cli("start", "--daemon", "--nodes", "2", config=srv.config, env=_daemon_env())
    try:
        assert r.returncode == 0, r.stderr
        assert len(node_pids(srv)) == 2  # every node accepts once it returned
        srv.ftp().quit()
        # A second cluster on the same port fails with the reason.
        other = make_server(tmp_path / "e")
        cfg = other.config.read_text().replace(f":{other.port}", f":{srv.port}")
        other.config.write_text(cfg)
        r2 = cli("start", "--daemon", config=other.config, env=_daemon_env())
        assert r2.returncode == 1 and "Address already in use" in r2.stderr
        # The same config again, or another on its state_dir: refused before binding,
        # naming the running supervisor (which stays the one `status` and `stop` reach).
        pid = (srv.dir / "state" / "ftpcluster.pid").read_text().strip()
        shared = make_server(tmp_path / "g")
        shared.config.write_text(shared.config.read_text().replace('state_dir = "state"', f'state_dir = "{srv.dir / "state"}"'))
        for config in (srv.config, shared.config):
            r3 = cli("start", "--daemon", config=config, env=_daemon_env())
            assert r3.returncode == 1 and "already running on state_dir" in r3.stderr and f"pid {pid}" in r3.stderr, r3.stderr
        assert (srv.dir / "state" / "ftpcluster.pid").read_text().strip() == pid
        assert srv.status()["supervisor_pid"] == int(pid)
    finally:
        cli("stop", "--timeout", "5s", config=srv.config)
    # An unreadable certificate fails before anything forks.
    bad = make_server(tmp_path / "f", tls=True)
    (bad.dir / "certs" / "cert.pem").write_text("not a certificate\n")
    r3 = cli("start", "--daemon", config=bad.config, env=_daemon_env())
    assert r3.returncode == 1 and "certificate" in r3.stderr.lower()


def test_boot_failure_backs_off_and_exits(tmp_path):
    """A node that dies at boot every time: the supervisor gives up instead of forking
    forever, and the log says why (under --daemon stderr is /dev/null)."""
    srv = make_server(tmp_path / "g", tls=True, log={"level": "info", "format": "json", "file": "server.log"})
    env = _daemon_env()
    env["FTPCLUSTER_FAULT"] = "node-boot"  # the node raises before it accepts
    r = cli("start", "--daemon", "--nodes", "1", config=srv.config, env=env, timeout=60)
    assert r.returncode == 1
    assert "failing at boot" in (r.stderr + r.stdout)
    logged = (srv.dir / "server.log").read_text()
    assert '"node failed to boot"' in logged and "injected boot failure" in logged, logged[-2000:]


def test_sd_notify(tmp_path):
    import socket
    import subprocess

    srv = make_server(tmp_path / "n")
    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=addr, WATCHDOG_USEC="400000")
    proc = subprocess.Popen([*FTPCLUSTER, "start", "--config", str(srv.config), "--nodes", "1"], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    got: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while not any("READY=1" in m for m in got) and time.monotonic() < deadline:
            got.append(sock.recv(4096).decode())
        wait_for(lambda: got.append(sock.recv(4096).decode()) or any("WATCHDOG=1" in m for m in got), what="watchdog")
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: got.append(sock.recv(4096).decode()) or any("RELOADING=1" in m for m in got), what="reloading")
        os.kill(proc.pid, signal.SIGTERM)
        wait_for(lambda: got.append(sock.recv(4096).decode()) or any("STOPPING=1" in m for m in got), what="stopping")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        sock.close()
    ready = next(m for m in got if "READY=1" in m)
    assert "STATUS=" in ready and f"MAINPID={proc.pid}" in ready


def test_systemd_unit_verifies():
    import subprocess

    require("systemd-analyze")  # make sysdeps installs it (package systemd)
    units = sorted((REPO / "deploy").glob("*.service"))
    assert units
    r = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    # verify also complains about the ExecStart binary not existing on a dev box; nothing else.
    problems = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and "is not executable" not in l
                and "No such file or directory" not in l and "Command " not in l]  # fmt: skip
    assert not problems, r.stdout + r.stderr


def test_stalled_node_is_killed_and_replaced(server_factory):
    srv = server_factory(nodes=2, server={"heartbeat_timeout": "2s"})
    pids = node_pids(srv)
    os.kill(pids[1], signal.SIGSTOP)  # alive but silent: no heartbeat
    try:
        wait_for(lambda: node_pids(srv).get(1) not in (None, pids[1]), timeout=20, what="stalled node replaced")
        assert not alive(pids[1])
        assert node_pids(srv)[2] == pids[2]
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_root_start_drops_to_server_user(tmp_path):
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="ftpc-drop-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        srv = make_server(base / "s", server={"user": "nobody"})
        srv.home.mkdir(parents=True, exist_ok=True)
        for root, dirs, files in os.walk(base):
            for n in [root, *(os.path.join(root, x) for x in dirs + files)]:
                os.chown(n, nobody.pw_uid, nobody.pw_gid)
        srv.start(nodes=2)
        try:
            pids = list(node_pids(srv).values())
            for pid in [srv.proc.pid, *pids]:
                assert os.stat(f"/proc/{pid}").st_uid == nobody.pw_uid
            f = srv.ftp()
            f.storbinary("STOR owned.txt", io.BytesIO(b"x"))
            f.quit()
            assert (srv.home / "owned.txt").stat().st_uid == nobody.pw_uid
        finally:
            srv.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _low_soft_fd_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


def test_nodes_get_the_hard_descriptor_limit(server_factory) -> None:
    """Started with a soft limit of 256 (a shell's), the nodes run with the hard limit,
    and a limit too low for max_sessions_per_node is logged at start with the fix."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv = server_factory(start=False, server={"max_sessions_per_node": 100000})
    srv.start(nodes=1, preexec_fn=_low_soft_fd_limit)
    pids = list(node_pids(srv).values())
    assert pids
    limits = (Path("/proc") / str(pids[0]) / "limits").read_text()
    soft = next(line.split()[3] for line in limits.splitlines() if line.startswith("Max open files"))
    assert soft == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard)), limits
    if hard != resource.RLIM_INFINITY and hard < 100000 * 3:
        assert "descriptor limit below what max_sessions_per_node needs" in srv.logs()
