"""The servers under comparison, each started by the bench on loopback with a
random port, a temp dir, the same user/password, the same certificate and the
same files (hard links to one copy). A peer that cannot start is skipped with a
note; it never fails the whole bench."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support_server import PASSWORD, REPO, cli, free_port, make_server, passive_range, wait_port

USER = "alice"
FTPCLUSTER_TLS = {"session_cache": "local", "session_tickets": "local", "require_data_session_reuse": False}
MAX_SESSIONS = 20000
FLOOR = "floor"  # bench/floor_server.py, sessions and ftps_resumed only (--peers ...,floor)
FLOOR_WORKLOADS = ("sessions", "ftps_resumed")
QUIET = "ftpcluster@warning"  # ftpcluster at log level warning (the main peer runs at the default, info)


@dataclass
class Files:
    """What every peer serves: the big file for RETR (also the upload source) and
    a 1 KB file for small RETRs."""

    base: Path
    cert: Path
    key: Path
    big: Path
    big_mb: int
    small: Path | None = None


@dataclass
class Peer:
    name: str
    host: str
    port: int
    home: Path
    proc: subprocess.Popen[bytes] | None
    log: Path
    user: str = USER
    password: str = PASSWORD
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stopper: Any = None
    config: Path | None = None  # ftpcluster's config file
    # Static host ban and its removal (None: this peer has no ban support).
    ban_host: Callable[[str], None] | None = None
    permit_host: Callable[[str], None] | None = None

    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"ftp://{self.user}:{self.password}@{self.host}:{self.port}{path}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.stopper is not None:
            self.stopper()
        else:
            _kill_group(self.proc)
        for p in self.extra:
            _kill_group(p)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _kill_group(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _share(files: Files, home: Path) -> None:
    """Same bytes in every home: a hard link (no copy, same page cache)."""
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o777)  # ProFTPD sessions run as nobody
    for src in (files.big, files.small):
        if src is None:
            continue
        dst = home / src.name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)


def prepare_files(base: Path, big_mb: int) -> Files:
    from ftpcluster.certs import generate_self_signed

    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    cert, key = generate_self_signed(base / "certs")
    os.chmod(key, 0o644)  # readable by each peer whatever user it runs as
    big = base / f"big{big_mb}.bin"
    chunk = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for _ in range(big_mb):
            f.write(chunk)
    os.chmod(big, 0o644)
    small = base / "small1k.bin"
    small.write_bytes(os.urandom(1024))
    os.chmod(small, 0o644)
    return Files(base, cert, key, big, big_mb, small)


# -- ftpcluster ---------------------------------------------------------------

def start_ftpcluster(files: Files, nodes: int, level: str = "info") -> Peer:
    """ftpcluster at `level` (info is its default: session logging on)."""
    name = "ftpcluster" if level == "info" else QUIET
    tmp = files.base / name.replace("@", "-")
    (tmp / "certs").mkdir(parents=True, exist_ok=True)
    shutil.copy(files.cert, tmp / "certs" / "cert.pem")
    shutil.copy(files.key, tmp / "certs" / "key.pem")
    srv = make_server(
        tmp,
        tls=dict(FTPCLUSTER_TLS),
        log={"level": level},
        server={"max_sessions_per_node": MAX_SESSIONS, "idle_timeout": "600s", "login_timeout": "600s"},
    )
    _share(files, srv.home)
    srv.start(nodes=nodes)

    def ban(ip: str) -> None:
        _check(cli("ban", "host", ip, "--for", "1h", "--reason", "bench", config=srv.config, timeout=30), "ban")

    def permit(ip: str) -> None:
        _check(cli("permit", "host", ip, config=srv.config, timeout=30), "permit")

    return Peer(name, srv.host, srv.port, srv.home, srv.proc, tmp / "server.log", stopper=srv.stop,
                config=srv.config, ban_host=ban, permit_host=permit)  # fmt: skip


def _check(r: subprocess.CompletedProcess[str], what: str) -> None:
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")


# -- pyftpdlib ----------------------------------------------------------------

def start_pyftpdlib(files: Files, workers: int) -> Peer:
    tmp = files.base / "pyftpdlib"
    home = tmp / "home"
    _share(files, home)
    port = free_port()
    lo, hi = passive_range(256)
    args = ["--port", str(port), "--user", USER, "--password", PASSWORD, "--home", str(home), "--passive", f"{lo}-{hi}",
            "--cert", str(files.cert), "--key", str(files.key), "--workers", str(workers), "--max-cons", str(MAX_SESSIONS)]
    return _start_module("pyftpdlib", "bench.pyftpd_server", args, tmp, home, port)


def _start_module(name: str, module: str, args: list[str], tmp: Path, home: Path, port: int) -> Peer:
    """`python -m module args` on loopback `port`, logging to tmp/server.log, once it listens."""
    log = tmp / "server.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", module, *args],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True)  # fmt: skip
    peer = Peer(name, "127.0.0.1", port, home, proc, log)
    try:
        wait_port("127.0.0.1", port, proc=proc, log=log)
    except Exception:
        peer.stop()
        raise
    return peer


def start_floor(files: Files, workers: int) -> Peer:
    """bench/floor_server.py: what a login costs in kernel, event loop and OpenSSL alone."""
    tmp = files.base / FLOOR
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = ["--port", str(port), "--workers", str(workers), "--cert", str(files.cert), "--key", str(files.key)]
    return _start_module(FLOOR, "bench.floor_server", args, tmp, tmp, port)


# -- ProFTPD ------------------------------------------------------------------

PROFTPD = "/usr/sbin/proftpd"
MODULES = "/usr/lib/proftpd"


def proftpd_missing() -> str | None:
    """Why ProFTPD can't run here, or None."""
    binary = shutil.which("proftpd") or (PROFTPD if os.path.exists(PROFTPD) else None)
    if binary is None:
        return "proftpd not installed (apt-get install proftpd-core proftpd-mod-crypto)"
    for mod in ("mod_tls.so", "mod_ban.so", "mod_memcache.so", "mod_tls_memcache.so"):
        if not os.path.exists(os.path.join(MODULES, mod)):
            return f"{MODULES}/{mod} missing (Debian ships mod_tls* in proftpd-mod-crypto)"
    if shutil.which("memcached") is None:
        return "memcached not installed"
    return None


def ensure_proftpd() -> str | None:
    """Install the TLS modules when we can (root + apt) and they are missing:
    Debian splits them out of proftpd-core. Returns why ProFTPD is unavailable."""
    why = proftpd_missing()
    if why and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "proftpd-core", "proftpd-mod-crypto", "memcached"]
        try:
            if subprocess.run(cmd, capture_output=True, env=env, timeout=300).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300)
                subprocess.run(cmd, capture_output=True, env=env, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            pass
        why = proftpd_missing()
    return why


def _crypt_sha512(password: str) -> str:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # removed in 3.13; openssl below then

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_SHA512))
    except ImportError:
        r = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True, text=True, check=True)
        return r.stdout.strip()


def _start_memcached(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = ["memcached", "-p", str(port), "-l", "127.0.0.1", "-U", "0", "-m", "64"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    log = open(tmp / "memcached.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"memcached exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    _kill_group(proc)
    raise TimeoutError("memcached did not listen")


def proftpd_config(tmp: Path, port: int, passive: tuple[int, int], files: Files, mc_port: int) -> str:
    root = os.geteuid() == 0
    identity = "User nobody\nGroup nogroup\n" if root else ""
    return f"""# generated by bench/peers.py
ServerType standalone
ServerName "proftpd bench"
DefaultServer on
UseIPv6 off
DefaultAddress 127.0.0.1
SocketBindTight on
Port {port}
PassivePorts {passive[0]} {passive[1]}
{identity}PidFile {tmp}/proftpd.pid
ScoreboardFile {tmp}/proftpd.scoreboard
DelayTable none
WtmpLog off
UseReverseDNS off
UseSendfile on
DelayEngine off
MaxInstances {MAX_SESSIONS + 100}
MaxClients none
MaxLoginAttempts 3
TimeoutIdle 600
TimeoutLogin 600
SystemLog {tmp}/proftpd.system.log
TransferLog NONE
AuthOrder mod_auth_file.c
AuthUserFile {tmp}/passwd
AuthGroupFile {tmp}/group
RequireValidShell off
DefaultRoot ~
AllowOverwrite on
# APPE (and REST STOR) are refused with 451 otherwise; the other peers allow them.
AllowStoreRestart on
Umask 022

ModulePath {MODULES}
LoadModule mod_ban.c
LoadModule mod_memcache.c
LoadModule mod_tls.c
LoadModule mod_tls_memcache.c

<IfModule mod_memcache.c>
  MemcacheEngine on
  MemcacheServers 127.0.0.1:{mc_port}
  MemcacheLog none
</IfModule>

<IfModule mod_tls.c>
  TLSEngine on
  TLSLog none
  TLSProtocol TLSv1.2 TLSv1.3
  TLSRSACertificateFile {files.cert}
  TLSRSACertificateKeyFile {files.key}
  # Without a CA file mod_tls loads OpenSSL's default verify paths in every
  # forked session: the whole CA bundle, ~100 ms a login. One small file instead.
  TLSCACertificateFile {files.cert}
  TLSRequired off
  TLSVerifyClient off
  TLSOptions NoSessionReuseRequired
  TLSSessionCache memcache:/
  TLSSessionTickets on
</IfModule>

# Controls (ftpdctl) for static bans: mod_ban's `ban host` adds to the BanTable.
ControlsEngine on
ControlsSocket {tmp}/ctrls.sock
ControlsInterval 1
ControlsACLs all allow user root

<IfModule mod_ban.c>
  BanEngine on
  BanControlsACLs all allow user root
  BanLog none
  BanTable {tmp}/ban.tab
  BanCache memcache
  BanOnEvent MaxLoginAttempts 2/00:10:00 01:00:00
  BanMessage "Banned: %r"
</IfModule>
"""


def start_proftpd(files: Files) -> Peer:
    tmp = files.base / "proftpd"
    tmp.mkdir(parents=True, exist_ok=True)
    home = tmp / "home"
    _share(files, home)
    mc, mc_port = _start_memcached(tmp)
    try:
        uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
        (tmp / "passwd").write_text(f"{USER}:{_crypt_sha512(PASSWORD)}:{uid}:{gid}::{home}:/bin/sh\n")
        (tmp / "group").write_text(f"nogroup:x:{gid}:\n")
        os.chmod(tmp / "passwd", 0o600)
        port = free_port()
        conf = tmp / "proftpd.conf"
        conf.write_text(proftpd_config(tmp, port, passive_range(256), files, mc_port))
        log = tmp / "proftpd.log"
        # SSL_CERT_FILE (set in some sandboxes) would make OpenSSL read the CA bundle.
        env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        with open(log, "ab") as logf:
            proc = subprocess.Popen([shutil.which("proftpd") or PROFTPD, "-n", "-q", "-c", str(conf)],
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)  # fmt: skip
        ctl = [shutil.which("ftpdctl") or "ftpdctl", "-s", str(tmp / "ctrls.sock")]

        def ban(ip: str) -> None:
            if os.geteuid() != 0 or shutil.which("ftpdctl") is None:
                raise RuntimeError("static ProFTPD bans need ftpdctl as root (ControlsACLs)")
            _check(subprocess.run([*ctl, "ban", "host", ip], capture_output=True, text=True, timeout=30), "ftpdctl ban")

        def permit(ip: str) -> None:
            _check(subprocess.run([*ctl, "permit", "host", ip], capture_output=True, text=True, timeout=30), "ftpdctl permit")

        peer = Peer("proftpd", "127.0.0.1", port, home, proc, log, extra=[mc], ban_host=ban, permit_host=permit)
    except Exception:
        _kill_group(mc)
        raise
    try:
        wait_port("127.0.0.1", port, proc=proc, log=log)
    except Exception:
        peer.stop()
        raise
    return peer
