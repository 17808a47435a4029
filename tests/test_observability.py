"""Metrics, JSON logs with session context, trace channels, xferlog and log reopening,
checked against a real multi-node server."""

from __future__ import annotations

import ftplib
import io
import json
import os
import signal
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .support_cluster import node_pids, session_pid, sessions_on_every_node, wait_for
from .support_server import free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_metrics_move_across_nodes(server_factory):
    port = free_port()
    srv = server_factory(nodes=2, metrics={"listen": f"127.0.0.1:{port}"})
    before = scrape(port)
    by_pid = sessions_on_every_node(srv, 2)
    assert len(by_pid) == 2
    payload = os.urandom(10_000)
    for sessions in by_pid.values():
        for f in sessions:
            f.storbinary("STOR m.bin", io.BytesIO(payload))
            f.retrbinary("RETR m.bin", lambda b: None)
    try:
        srv.ftp(login=False).login("alice", "wrong")
    except ftplib.error_perm:
        pass
    opened = sum(len(v) for v in by_pid.values())
    # Counters move as each node finishes its bookkeeping: wait for the last ones to land.
    failed_key = ("ftpcluster_logins_total", (("result", "failed"),))
    after = wait_for(
        lambda: (a := scrape(port)) and a.get(failed_key) == 1
        and a.get(("ftpcluster_bytes_total", (("direction", "in"),))) == opened * len(payload)
        and a.get(("ftpcluster_bytes_total", (("direction", "out"),))) == opened * len(payload) and a,
        what="transfer and login counters",
    )
    assert after[("ftpcluster_sessions_total", ())] - before[("ftpcluster_sessions_total", ())] >= opened + 1
    assert after[("ftpcluster_sessions", ())] >= opened
    assert after[("ftpcluster_logins_total", (("result", "ok"),))] >= opened
    assert after[("ftpcluster_logins_total", (("result", "failed"),))] == 1
    assert after[("ftpcluster_bytes_total", (("direction", "in"),))] == opened * len(payload)
    assert after[("ftpcluster_bytes_total", (("direction", "out"),))] == opened * len(payload)
    assert after[("ftpcluster_transfers_total", (("direction", "in"), ("status", "ok")))] == opened
    assert after[("ftpcluster_commands_total", (("verb", "STOR"),))] == opened
    for sessions in by_pid.values():
        for f in sessions:
            f.quit()
    # A node killed by the supervisor's hand: its counters stay, restarts count.
    victim = next(iter(node_pids(srv).values()))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: scrape(port)[("ftpcluster_node_restarts_total", ())] == 1, what="restart counted")
    assert scrape(port)[("ftpcluster_logins_total", (("result", "ok"),))] >= opened
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").headers["Content-Type"].startswith("text/plain")


def test_json_logs_carry_session_context(server_factory):
    srv = server_factory(nodes=2)
    f = srv.ftp()
    pid = session_pid(f)
    f.quit()
    try:
        srv.ftp(login=False).login("mallory", "guess")
    except ftplib.error_perm:
        pass
    lines = wait_for(lambda: (t := json_lines(srv.logs())) and any(r.get("event") == "login failed" for r in t) and t,
                     what="the failed login logged")  # fmt: skip
    login = [r for r in lines if r.get("event") == "login ok"]
    assert len(login) == 1 and login[0]["user"] == "alice" and login[0]["client"] == "127.0.0.1"
    assert login[0]["node"] in (1, 2) and login[0]["session"].split("-")[1] == str(pid), login
    failed = [r for r in lines if r.get("event") == "login failed"]
    assert failed and failed[0]["user"] == "mallory" and failed[0]["client"] == "127.0.0.1"
    assert all("timestamp" in r and "level" in r for r in lines)


def test_trace_channel_turns_on_one_subsystem(server_factory):
    quiet = server_factory(name="quiet")
    loud = server_factory(name="loud", log={"trace": {"command": "debug"}})
    for srv in (quiet, loud):
        f = srv.ftp()
        f.sendcmd("NOOP")
        f.quit()
    # The session's last record (disconnect) comes after any record of its NOOP; the
    # start's port probe also disconnects, but never logged in.
    for srv in (quiet, loud):
        wait_for(lambda: any(r.get("event") == "disconnect" and r.get("user") for r in json_lines(srv.logs())),
                 what="disconnect logged")
    assert not [r for r in json_lines(quiet.logs()) if r.get("event") == "command"]
    cmds = [r for r in json_lines(loud.logs()) if r.get("event") == "command"]
    assert any(r.get("verb") == "NOOP" for r in cmds)
    assert not [r for r in json_lines(loud.logs()) if r.get("level") == "debug" and r.get("channel") not in ("command", None)]


def _xfer(line: str) -> dict:
    f = line.split()
    # Mon Nov 24 22:46:35 2026 | secs host bytes name type action dir mode user service auth uid status
    return {"secs": f[5], "host": f[6], "bytes": int(f[7]), "name": f[8], "type": f[9], "action": f[10], "dir": f[11],
            "mode": f[12], "user": f[13], "service": f[14], "auth": f[15], "uid": f[16], "status": f[17]}  # fmt: skip


def test_xferlog_upload_download_abort(server_factory):
    srv = server_factory(log={"xferlog": "xfer.log"})
    srv.home.mkdir(parents=True, exist_ok=True)
    (srv.home / "big.bin").write_bytes(os.urandom(32 * 1024 * 1024))
    f = srv.ftp()
    f.storbinary("STOR up load.txt", io.BytesIO(b"x" * 5000))
    f.retrbinary("RETR up load.txt", lambda b: None)
    f.voidcmd("TYPE I")
    conn = f.transfercmd("RETR big.bin")
    conn.recv(65536)
    try:
        f.abort()
    except ftplib.Error:
        pass
    conn.close()
    f.quit()
    path = srv.dir / "xfer.log"
    lines = wait_for(lambda: (t := path.read_text().splitlines()) and len(t) >= 3 and t, what="3 xferlog lines")
    recs = [_xfer(line) for line in lines]
    up, down, aborted = recs[0], recs[1], recs[2]
    assert up["dir"] == "i" and up["bytes"] == 5000 and up["status"] == "c" and up["name"].endswith("up_load.txt")
    assert down["dir"] == "o" and down["status"] == "c" and down["user"] == "alice" and down["type"] == "b"
    # An incomplete transfer says what it moved (the client read 64 KB of it), as
    # wu-ftpd and ProFTPD do, and the session log and byte counter agree.
    assert aborted["dir"] == "o" and aborted["status"] == "i" and 65536 <= aborted["bytes"] < 32 * 1024 * 1024
    logged = wait_for(lambda: [r for r in json_lines(srv.logs()) if r.get("event") == "transfer" and r.get("status") == "aborted"],
                      what="the aborted transfer's log record")  # fmt: skip
    assert logged[-1]["bytes"] == aborted["bytes"] and logged[-1]["seconds"] > 0, logged
    for r in recs:
        assert r["host"] == "127.0.0.1" and r["service"] == "ftp" and r["mode"] == "r" and r["action"] == "_"
        assert int(r["secs"]) >= 0


def test_sigusr1_reopens_log_files(server_factory):
    srv = server_factory(nodes=2, log={"file": "ftp.log", "xferlog": "xfer.log"})
    f = srv.ftp()
    f.storbinary("STOR a", io.BytesIO(b"a"))
    f.quit()
    log, xfer = srv.dir / "ftp.log", srv.dir / "xfer.log"
    wait_for(lambda: log.exists() and xfer.exists(), what="log files")
    os.rename(log, srv.dir / "ftp.log.1")
    os.rename(xfer, srv.dir / "xfer.log.1")
    os.kill(srv.proc.pid, signal.SIGUSR1)  # reaches the nodes through the supervisor: retry until it did

    def fresh() -> bool:
        g = srv.ftp()
        g.storbinary("STOR b", io.BytesIO(b"b"))
        g.quit()
        return log.exists() and xfer.exists() and "login ok" in log.read_text()

    wait_for(fresh, what="new log files")
