"""Multi-host plumbing for test_multihost.py: network namespaces joined by a bridge
that lives in its own namespace (nothing touches the host's network), processes run
inside them and always killed, a haproxy config shaped like deploy/haproxy.cfg, and
FTP/FTPS client functions that run in the client namespace (or in-process for the
loopback variant).

Run as a module, this file is the client side: `python -m tests.support_netns JSON`
calls one client function with keyword arguments and prints its JSON result."""

from __future__ import annotations

import contextlib
import fcntl
import ftplib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
SUBNET = "10.213.0"  # private, only ever configured inside our namespaces
ROLES = ("ftp1", "ftp2", "mc", "lb", "client")
ADDRESSES = {"lb": f"{SUBNET}.2", "ftp1": f"{SUBNET}.11", "ftp2": f"{SUBNET}.12", "mc": f"{SUBNET}.20", "client": f"{SUBNET}.99"}
LOCK_DIR = Path("/tmp/ftpcluster-netns")
_NS_RE = re.compile(r"^(fc[0-9a-f]{4})-(br|probe|" + "|".join(ROLES) + r")$")


# ------------------------------------------------------------------ commands
def run(*cmd: str, check: bool = True, timeout: float = 20, input: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def netns_unavailable() -> str | None:
    """Why the namespace topology cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_SYS_ADMIN"
    if not Path("/usr/sbin/ip").exists() and not any((Path(p) / "ip").exists() for p in os.environ.get("PATH", "").split(":")):
        return "iproute2 (ip) is not installed"
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    tag = f"fc{secrets.token_hex(2)}"
    probe = f"{tag}-probe"
    lock = LOCK_DIR / f"{tag}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # clean_leftovers() of a concurrent run leaves it alone
    try:
        r = run("ip", "netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"ip netns add failed: {r.stderr.strip()}"
        steps = [
            (["ip", "-n", probe, "link", "add", "br0", "type", "bridge"], "cannot create a bridge in a namespace"),
            (["ip", "-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0"], "cannot create a veth pair"),
            (["ip", "netns", "exec", probe, "true"], "ip netns exec does not work"),
        ]
        for cmd, why in steps:
            r = run(*cmd, check=False)
            if r.returncode != 0:
                return f"{why}: {r.stderr.strip()}"
        return None
    finally:
        run("ip", "netns", "del", probe, check=False)
        os.close(fd)
        with contextlib.suppress(OSError):
            lock.unlink()


def list_netns() -> list[str]:
    r = run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def kill_netns(name: str) -> None:
    """Kill every process inside `name`, then delete it (its veths go with it)."""
    for _ in range(3):
        pids = [int(p) for p in run("ip", "netns", "pids", name, check=False).stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    run("ip", "netns", "del", name, check=False)


def _lock_is_free(path: Path) -> bool:
    """True if no live run holds `path` (its owner died or never existed)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def clean_leftovers() -> list[str]:
    """Remove namespaces of earlier runs that died without tearing down (their lock
    is free); a concurrent run holds its lock and is left alone."""
    removed = []
    for name in list_netns():
        m = _NS_RE.match(name)
        if m and _lock_is_free(LOCK_DIR / f"{m.group(1)}.lock"):
            kill_netns(name)
            removed.append(name)
    for lock in LOCK_DIR.glob("fc*.lock") if LOCK_DIR.exists() else []:
        with contextlib.suppress(OSError):  # young files may be a run between open and flock
            if time.time() - lock.stat().st_mtime < 60:
                continue
        if _lock_is_free(lock):
            with contextlib.suppress(OSError):
                lock.unlink()
    return removed


class Topology:
    """Namespaces <prefix>-{ftp1,ftp2,mc,lb,client}, each with eth0 on one bridge inside
    <prefix>-br. The run holds <prefix>.lock from before the first namespace exists
    until after the last is gone, so clean_leftovers() of a concurrent run skips it."""

    def __init__(self, client_sources: int = 24) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        existing = set(list_netns())
        for _ in range(100):
            prefix = f"fc{secrets.token_hex(2)}"
            if not any(n.startswith(prefix + "-") for n in existing) and not (LOCK_DIR / f"{prefix}.lock").exists():
                break
        self.prefix = prefix
        self.lock_path = LOCK_DIR / f"{prefix}.lock"
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.created: list[str] = []
        self.sources = [f"{SUBNET}.{100 + i}" for i in range(client_sources)]

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]

    def build(self) -> "Topology":
        br = self.ns("br")
        run("ip", "netns", "add", br)
        self.created.append(br)
        run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", br, "link", "set", "br0", "up")
        for role in ROLES:
            ns = self.ns(role)
            run("ip", "netns", "add", ns)
            self.created.append(ns)
            # Created directly in the two namespaces: the root namespace never sees it.
            run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", role, "netns", br)
            run("ip", "-n", br, "link", "set", role, "master", "br0")
            run("ip", "-n", br, "link", "set", role, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"{ADDRESSES[role]}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
        lines = "".join(f"addr add {a}/24 dev eth0\n" for a in self.sources)
        run("ip", "-n", self.ns("client"), "-batch", "-", input=lines)
        return self

    def set_link(self, role: str, up: bool) -> None:
        run("ip", "-n", self.ns(role), "link", "set", "eth0", "up" if up else "down")

    def destroy(self) -> None:
        try:
            for name in reversed(self.created):
                kill_netns(name)
            for name in list_netns():  # anything of ours a failed build left unlisted
                if name.startswith(self.prefix + "-"):
                    kill_netns(name)
        finally:
            os.close(self._lock_fd)
            with contextlib.suppress(OSError):
                self.lock_path.unlink()


# ------------------------------------------------------------------ processes
@dataclass
class Proc:
    """A long-running process (optionally inside a namespace) in its own process group."""

    name: str
    cmd: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> "Proc":
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO),
                                         start_new_session=True, env=env)  # fmt: skip
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # nodes share the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


# ------------------------------------------------------------------ haproxy
@dataclass
class LBHost:
    """One FTP host as the balancer sees it."""

    index: int
    addr: str
    control_port: int
    implicit_port: int
    passive: tuple[int, int]


def haproxy_config(lb: str, control_port: int, implicit_port: int, hosts: list[LBHost], stats: Path) -> str:
    """deploy/haproxy.cfg for these hosts, with test timeouts: checks every 500 ms,
    down after 2 failures, 1 s connect timeout (no `option redispatch`, as deployed)."""
    out = [
        "global",
        f"    stats socket {stats} mode 600 level admin",
        "    maxconn 2000",
        "defaults",
        "    mode tcp",
        "    timeout connect 1s",
        "    timeout check 2s",  # a slow banner under load is not a dead host; a cut host fails at connect
        "    timeout client 60s",
        "    timeout server 60s",
        "frontend ftp_control",
        f"    bind {lb}:{control_port}",
        "    default_backend ftp_control",
        "backend ftp_control",
        "    balance source",
        "    hash-type consistent",
        "    stick-table type ipv6 size 1k expire 30m",
        "    stick on src",
        "    option tcp-check",
        "    tcp-check connect default",
        "    tcp-check expect rstring ^220",
        '    tcp-check send "QUIT\\r\\n"',
        "    tcp-check expect rstring ^221",
        "    default-server send-proxy-v2 check check-send-proxy inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions",
    ]
    out += [f"    server ftp-{h.index} {h.addr}:{h.control_port} id {h.index}" for h in hosts]
    out += [
        "frontend ftps_implicit",
        f"    bind {lb}:{implicit_port}",
        "    default_backend ftps_implicit",
        "backend ftps_implicit",
        "    balance source",
        "    hash-type consistent",
        "    stick on src table ftp_control",
        "    default-server send-proxy-v2 on-marked-down shutdown-sessions",
    ]
    out += [f"    server ftp-{h.index} {h.addr}:{h.implicit_port} id {h.index} track ftp_control/ftp-{h.index}" for h in hosts]
    for h in hosts:
        out += [
            f"frontend ftp_passive_{h.index}",
            f"    bind {lb}:{h.passive[0]}-{h.passive[1]}",
            f"    default_backend ftp_passive_{h.index}",
            f"backend ftp_passive_{h.index}",
            f"    server ftp-{h.index} {h.addr} send-proxy-v2 track ftp_control/ftp-{h.index}",
        ]
    return "\n".join(out) + "\n"


def haproxy_command(stats: Path, stats_cmd: str) -> str:
    """One command on haproxy's admin socket (a file, so reachable from any namespace)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(stats))
        s.sendall(stats_cmd.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode(errors="replace")


# ------------------------------------------------------------------ clients
def _ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _PasvMixin:
    """Records the address and port each PASV reply names (the masquerade address must be the balancer's)."""

    pasv_hosts: list[tuple[str, int]]

    def makepasv(self):  # type: ignore[no-untyped-def]
        host, port = super().makepasv()  # type: ignore[misc]
        self.pasv_hosts.append((host, port))
        return host, port


class PlainFTP(_PasvMixin, ftplib.FTP):
    pass


class ExplicitFTPS(_PasvMixin, ftplib.FTP_TLS):
    """AUTH TLS; data channels resume the control session (the server requires it)."""

    def ntransfercmd(self, cmd, rest=None):  # type: ignore[no-untyped-def]
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


class ImplicitFTPS(ExplicitFTPS):
    """TLS from the first byte (port 990 style)."""

    def connect(self, host="", port=0, timeout=-999, source_address=None):  # type: ignore[no-untyped-def]
        self.host, self.port = host, port
        if timeout != -999:
            self.timeout = timeout
        if source_address is not None:
            self.source_address = source_address
        raw = socket.create_connection((host, port), self.timeout, source_address=self.source_address)
        self.sock = self.context.wrap_socket(raw, server_hostname=host)
        self.af = self.sock.family
        self.file = self.sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        return self.welcome


def session(host: str, port: int, source: str, mode: str = "plain", transfer: int = 0, timeout: float = 10,
            user: str = "alice", password: str = "") -> dict[str, Any]:  # fmt: skip
    """Connect from `source`, log in, STAT, optionally upload `transfer` random bytes and
    read them back, QUIT. Never raises: errors are part of the result."""
    t0 = time.time()
    res: dict[str, Any] = {"source": source, "mode": mode, "t0": t0, "ok": False, "banner": "", "error": None}
    cls = {"plain": PlainFTP, "explicit": ExplicitFTPS, "implicit": ImplicitFTPS}[mode]
    f = cls(timeout=timeout, context=_ctx()) if mode != "plain" else cls(timeout=timeout)
    f.pasv_hosts = []
    f.trust_server_pasv_ipv4_address = True  # use what PASV says, so a wrong masquerade shows
    try:
        res["banner"] = f.connect(host, port, source_address=(source, 0))
        f.login(user, password)
        if mode != "plain":
            f.prot_p()
            res["tls_version"] = f.sock.version()
        res["stat"] = f.sendcmd("STAT")
        if transfer:
            data = os.urandom(transfer)
            name = f"mh-{source}-{secrets.token_hex(3)}.bin"
            f.storbinary(f"STOR {name}", _Reader(data))
            back: list[bytes] = []
            f.retrbinary(f"RETR {name}", back.append)
            res.update(name=name, sent=hashlib.sha256(data).hexdigest(), back=hashlib.sha256(b"".join(back)).hexdigest())
        f.quit()
        res["ok"] = True
    except (OSError, EOFError, ftplib.Error, ssl.SSLError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
        f.close()
    res["pasv_hosts"] = f.pasv_hosts
    res["elapsed"] = time.time() - t0
    return res


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk


def greet(host: str, port: int, source: str, timeout: float = 10) -> str:
    """The server's first reply line (220 or a refusal), or the error."""
    try:
        with socket.create_connection((host, port), timeout=timeout, source_address=(source, 0)) as s:
            data = b""
            while b"\n" not in data:
                chunk = s.recv(1024)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"220"):
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                    s.recv(1024)
            return data.decode(errors="replace").strip() or "closed without a reply"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def greet_many(host: str, port: int, sources: list[str], timeout: float = 10) -> dict[str, str]:
    return {s: greet(host, port, s, timeout) for s in sources}


def probe(host: str, port: int, sources: list[str], hold: str, duration: float, interval: float = 0.25,
          timeout: float = 10, user: str = "alice", password: str = "") -> dict[str, Any]:  # fmt: skip
    """For `duration` seconds: a new login from each source every `interval` seconds
    (each in its own thread, so a stalled one does not delay the next), and one
    logged-in session from `hold` sending NOOP until it breaks."""
    start = time.time()
    end = start + duration
    logins: list[dict[str, Any]] = []
    held: dict[str, Any] = {}
    lock = threading.Lock()

    def attempt(src: str) -> None:
        r = session(host, port, src, "plain", 0, timeout, user, password)
        with lock:
            logins.append({k: r.get(k) for k in ("source", "t0", "elapsed", "ok", "banner", "error")})

    def holder() -> None:
        f = ftplib.FTP(timeout=timeout)
        try:
            held["banner"] = f.connect(host, port, source_address=(hold, 0))
            f.login(user, password)
            held["since"] = time.time()
            while time.time() < end:
                f.voidcmd("NOOP")
                held["last_ok"] = time.time()
                time.sleep(0.1)
        except (OSError, EOFError, ftplib.Error) as e:
            held.update(broke=time.time(), error=f"{type(e).__name__}: {e}")
        finally:
            f.close()

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    for tick in range(int(duration / interval)):
        time.sleep(max(0.0, start + tick * interval - time.time()))
        for src in sources:
            t = threading.Thread(target=attempt, args=(src,))
            t.start()
            threads.append(t)
    for t in threads:
        t.join(max(0.1, end + 2 * timeout - time.time()))
    return {"logins": sorted(logins, key=lambda r: r["t0"]), "held": held}


CLIENT_FUNCS: dict[str, Callable[..., Any]] = {"session": session, "greet": greet, "greet_many": greet_many, "probe": probe}


@dataclass
class ClientRunner:
    """Runs client functions in the client namespace (a fresh python per call), or
    in this process when `prefix` is empty (the loopback variant)."""

    prefix: list[str] = field(default_factory=list)
    timeout: float = 60

    def __call__(self, fn: str, **kw: Any) -> Any:
        if not self.prefix:
            return CLIENT_FUNCS[fn](**kw)
        return self.finish(self.spawn(fn, **kw))

    def spawn(self, fn: str, **kw: Any) -> subprocess.Popen[str]:
        cmd = [*self.prefix, sys.executable, "-m", "tests.support_netns", json.dumps({"fn": fn, "kw": kw})]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), start_new_session=True)

    def finish(self, p: subprocess.Popen[str]) -> Any:
        try:
            out, err = p.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate(timeout=5)
            raise
        if p.returncode != 0:
            raise RuntimeError(f"client failed ({p.returncode}): {err[-2000:]}")
        return json.loads(out)

    def background(self, fn: str, **kw: Any) -> Callable[[], Any]:
        """Start `fn` now; the returned callable waits for its result."""
        if self.prefix:
            p = self.spawn(fn, **kw)
            return lambda: self.finish(p)
        box: dict[str, Any] = {}
        t = threading.Thread(target=lambda: box.setdefault("r", CLIENT_FUNCS[fn](**kw)))
        t.start()

        def wait() -> Any:
            t.join(self.timeout)
            return box["r"]

        return wait


def main(argv: list[str]) -> int:
    req = json.loads(argv[0])
    print(json.dumps(CLIENT_FUNCS[req["fn"]](**req["kw"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
