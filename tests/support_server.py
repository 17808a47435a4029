"""Start real ftpcluster servers for tests: a config in a temp dir, random loopback
ports, a user, and a process that is always stopped afterwards."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftpcluster.config_doc import toml_value

REPO = Path(__file__).resolve().parent.parent
FTPCLUSTER = [sys.executable, "-m", "ftpcluster.cli"]
PASSWORD = "s3cret-pw"


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections and bind(0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Listening ports and passive ranges come from below the ephemeral range: a port the
# kernel may give any outgoing connection (a client's, memcached's, haproxy's) between
# "free" and the server's bind is a flaky start. Control ports [10000, 16000),
# passive ranges [16000, ephemeral); each handed out once per test process, and
# checked free on the address at the time.
PORT_FLOOR, PASSIVE_FLOOR = 10000, 16000
_used_ports: set[int] = set()
_used_ranges: set[int] = set()
# Under pytest-xdist (`make test` runs workers in parallel) each worker takes only the
# ports and passive ranges of its own residue class, so two workers never hand out the
# same one (a passive range is unbound between transfers: "free now" cannot tell).
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
_WORKERS = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def _ours(n: int) -> bool:
    return n % _WORKERS == _WORKER


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, outside the ephemeral range (see above)."""
    for _ in range(1000):
        port = random.randrange(PORT_FLOOR, PASSIVE_FLOOR)
        if _ours(port) and port not in _used_ports and _bindable(host, port):
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port below the passive floor")


def passive_range(size: int = 64, host: str = "127.0.0.1", also: tuple[str, ...] = ()) -> tuple[int, int]:
    """A passive range below the ephemeral ports, free on `host` (and the addresses in
    `also`, e.g. a balancer's) now and not handed out before in this process."""
    top = min(_ephemeral_low(), 32768) - size
    for _ in range(1000):
        base = random.randrange(PASSIVE_FLOOR, top, size)
        free = all(_bindable(a, p) for a in (host, *also) for p in range(base, base + size))
        if _ours(base // size) and base not in _used_ranges and free:
            _used_ranges.add(base)
            return base, base + size - 1
    raise RuntimeError("no passive range left below the ephemeral ports")


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def cli(*args: str, config: Path | None = None, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*FTPCLUSTER, *args]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env)


@dataclass
class Server:
    dir: Path
    config: Path
    host: str
    port: int
    passive: tuple[int, int]
    home: Path
    user: str = "alice"
    password: str = PASSWORD
    implicit_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    extra_users: dict[str, Path] = field(default_factory=dict)

    def start(self, nodes: int = 1, wait: bool = True, args: tuple[str, ...] = (), preexec_fn: Any = None) -> "Server":
        assert self.log is not None
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*FTPCLUSTER, "start", "--config", str(self.config), "--nodes", str(nodes), *args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            start_new_session=True,
            preexec_fn=preexec_fn,  # e.g. a lower RLIMIT_NOFILE
        )
        logf.close()
        if wait:
            wait_port(self.host, self.port, proc=self.proc, log=self.log)
            self.wait_nodes(nodes)
        return self

    def status(self, timeout: float = 10) -> dict[str, Any]:
        """What `ftpcluster status --json` prints, asked over the control socket from
        this process (no CLI start per poll; test_supervisor checks the command)."""
        from ftpcluster import config as config_mod
        from ftpcluster.supervisor.control_client import call

        reply = call(config_mod.load(str(self.config)), {"cmd": "status"}, timeout=timeout)
        assert reply.get("ok"), reply
        return reply["status"]

    def wait_nodes(self, nodes: int, timeout: float = 20) -> bool:
        """Wait until `nodes` nodes accept (the first greeting comes from the first node
        up; tests that spread sessions over nodes need them all). Bounded; a start
        meant to stay short of that (a test's business) just returns False."""

        def ready() -> bool:
            try:
                st = self.status(timeout=5)
            except Exception:
                return False
            return sum(n["state"] == "accepting" for n in st["nodes"]) >= nodes

        return bool(wait_for(ready, timeout, step=0.05))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with _suppress():
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Nodes are in the same process group; make sure none is left behind.
        with _suppress():
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def release(self) -> None:
        """Stopped for good (fixture teardown): its passive range may go to a later
        server (each xdist worker has only its share of the ranges)."""
        self.stop()
        _used_ranges.discard(self.passive[0])

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def ftp(self, login: bool = True, timeout: float = 10):  # -> ftplib.FTP
        import ftplib

        f = ftplib.FTP(timeout=timeout)
        f.connect(self.host, self.port)
        if login:
            f.login(self.user, self.password)
        return f

    def url(self, path: str = "/", scheme: str = "ftp") -> str:
        port = self.implicit_port if scheme == "ftps" else self.port
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{port}{path}"


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError, OSError))


def wait_port(host: str, port: int, timeout: float = 20, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(3) in (b"220", b"421", b"530"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not answer within {timeout}s")


_cert_cache: dict[str, Path] = {}
_hash_cache: dict[str, str] = {}


def copy_test_cert(cert_dir: Path) -> None:
    """cert.pem and key.pem into `cert_dir`: copies of one self-signed certificate made
    in-process once per test process (what `ftpcluster cert generate` writes; test_ftps
    and test_operator run that command themselves). Every server of a run presents the
    same certificate, as the hosts of one cluster do; a test that replaces or breaks
    the files changes only its own copies."""
    import atexit
    import tempfile

    from ftpcluster.certs import generate_self_signed

    if "dir" not in _cert_cache:
        _cert_cache["dir"] = Path(tempfile.mkdtemp(prefix="ftpcluster-test-cert-"))
        atexit.register(shutil.rmtree, _cert_cache["dir"], True)
        generate_self_signed(_cert_cache["dir"])
    cert_dir.mkdir(parents=True, exist_ok=True)
    for name in ("cert.pem", "key.pem"):
        shutil.copy2(_cert_cache["dir"] / name, cert_dir / name)  # key.pem keeps its 0600


def add_test_user(users_file: Path, name: str, home: Path, password: str = PASSWORD) -> None:
    """What `ftpcluster user add NAME --home HOME --password-stdin` does, in-process.
    The hash is argon2id like the command's, made once per password per test process
    and with the smallest cost argon2 allows: the servers verify it the same way (the
    cost is read from the hash), in microseconds instead of a 64 MiB, tens-of-ms
    computation on every first login of every node. test_operator and test_bad_input
    add users through the command itself, with its full-cost hash."""
    from ftpcluster.users import UserRecord, load_users, make_home, save_users

    if password not in _hash_cache:
        import argon2

        _hash_cache[password] = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(password)
    users = load_users(users_file)
    users[name] = UserRecord(name, _hash_cache[password], str(home.resolve()))
    make_home(home)
    save_users(users_file, users)


def make_server(tmp: Path, host: str = "127.0.0.1", tls: bool | dict[str, Any] = False, implicit: bool = False, **sections: dict[str, Any]) -> Server:
    """Write a config for a server under `tmp` (not started). Keyword sections merge
    into the generated ones, e.g. server={"max_login_attempts": 2}; `tls` is True or
    the [tls] keys to set (which turns TLS on)."""
    if isinstance(tls, dict):
        sections = {**sections, "tls": tls}
        tls = True
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    lo, hi = passive_range(host=host)
    server: dict[str, Any] = {
        "listen": f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
        "passive_ports": f"{lo}-{hi}",
        "state_dir": "state",
        "root": "ftproot",
        "users_file": "users.toml",
        "idle_timeout": "60s",
    }
    implicit_port = None
    if implicit:
        implicit_port = free_port(host)
        server["implicit_tls_listen"] = f"{host}:{implicit_port}"
    cfg: dict[str, dict[str, Any]] = {
        "server": server,
        "tls": {"enabled": tls or implicit, "session_cache": "local", "session_tickets": "local"},
        "log": {"level": "info", "format": "json"},
    }
    if tls or implicit:
        cert_dir = tmp / "certs"
        if not (cert_dir / "cert.pem").exists():
            copy_test_cert(cert_dir)
        cfg["tls"].update({"certificate": "certs/cert.pem", "private_key": "certs/key.pem"})
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    if "memcache" in sections and "session_key_file" not in cfg["tls"]:
        # What hosts share through memcached carries a MAC under the cluster key: the
        # hosts of one test (siblings under one tmp_path) get the same key file.
        from ftpcluster.cluster.session_seal import generate_key_file

        key = tmp.parent / "cluster.key"
        if not key.exists():
            generate_key_file(key)
        cfg["tls"]["session_key_file"] = str(key)
    config = tmp / "ftpcluster.toml"
    write_config(config, cfg)
    home = tmp / "homes" / "alice"
    add_test_user(tmp / "users.toml", "alice", home)
    return Server(tmp, config, host, port, (lo, hi), home, implicit_port=implicit_port, log=tmp / "server.log")


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes `sock` (or resets it) within `timeout`; data is drained."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (socket.timeout, TimeoutError):
        return False
    except OSError:
        return True


def wait_for(pred: Any, timeout: float = 10.0, step: float = 0.05) -> Any:
    """Poll `pred` until it returns something truthy (returned) or `timeout` passes
    (then its last value). Bounded in time like every loop in the tests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    return pred()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def require(*tools: str) -> None:
    """Skip when a peer tool is missing on a dev box; under CI (`CI` set, as every CI
    sets it) a missing tool fails instead, so a skip never hides an untested path
    (`make sysdeps` installs them all)."""
    import pytest

    missing = [t for t in tools if not have(t)]
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{', '.join(missing)} not installed (run make sysdeps)")
    pytest.skip(f"{', '.join(missing)} not installed")


def needs(*tools: str) -> Any:
    """A mark: skip when a tool is missing, except under CI, where the test runs (and
    fails on the missing tool) so a skip never hides an untested path."""
    import pytest

    missing = [t for t in tools if not have(t)]
    return pytest.mark.skipif(bool(missing) and not os.environ.get("CI"), reason=f"{', '.join(missing)} not installed")
