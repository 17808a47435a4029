"""`ftpcluster cluster check`: verify a running cluster from one host.

1. memcached: every configured server answers a write and a read-back.
2. hosts: every supervisor publishes itself in memcached (cluster/host_registry);
   all of them hold the same session key (fingerprints compared, never keys).
3. ban propagation: a user ban made here (a name nobody has, 60 s) refuses
   that user at PASS on every host, reached directly. The probe never logs in
   twice in one session, so it cannot trip MaxLoginAttempts.
4. TLS resumption: a TLS session from the balancer (or the first host) resumes
   on every host directly and through the balancer again.
Each step is one result {check, ok, detail}; exit 1 when any failed."""

from __future__ import annotations

import ftplib
import secrets
import ssl
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .cluster.host_registry import key_fingerprint, read_hosts
from .cluster.memcache_ring import Ring
from .cluster.record_mac import load_record_mac
from .cluster.session_seal import SealError
from .config import Config, parse_hostport

REFUSAL_WAIT = 10.0


@dataclass
class Result:
    check: str
    ok: bool
    detail: str


class _FTP(ftplib.FTP_TLS):
    """Explicit FTPS (or plain) with an optional source address and TLS session to offer."""

    offer: ssl.SSLSession | None = None

    def auth(self) -> str:
        resp = self.voidcmd("AUTH TLS")
        self.sock = self.context.wrap_socket(self.sock, server_hostname=None, session=self.offer)
        self.file = self.sock.makefile(mode="r", encoding=self.encoding)
        return resp


def _context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a health check of the cluster, not of the certificate
    return ctx


def _connect(host: str, port: int, source: str, tls: bool, ctx: ssl.SSLContext, offer: Any = None) -> _FTP:
    f = _FTP(context=ctx, timeout=10)
    f.offer = offer
    f.connect(host, port, source_address=(source, 0) if source else None)
    if tls:
        f.auth()
    return f


def check_memcached(cfg: Config) -> list[Result]:
    from pymemcache.client.base import Client

    out = []
    for addr in cfg.memcache.servers:
        host, port = parse_hostport(addr)
        c = Client((host, port), connect_timeout=max(cfg.memcache.timeout, 1.0), timeout=max(cfg.memcache.timeout, 1.0))
        key = f"{cfg.memcache.namespace}:v1:check:{secrets.token_hex(6)}"
        try:
            t0 = time.monotonic()
            version = c.version().decode(errors="replace")
            c.set(key, b"1", expire=30, noreply=False)
            ok = c.get(key) == b"1"
            c.delete(key, noreply=False)
            ms = (time.monotonic() - t0) * 1000
            out.append(Result(f"memcached {addr}", ok, f"version {version}, write and read back in {ms:.1f} ms" if ok else "value not read back"))
        except Exception as e:
            out.append(Result(f"memcached {addr}", False, f"unreachable: {type(e).__name__}: {e} (is it running and bound to an address this host can reach? firewall?)"))
        finally:
            c.close()
    return out


def check_hosts(cfg: Config, hosts: list[dict[str, Any]], expect: int, rejected: int = 0) -> list[Result]:
    """`rejected`: host records in memcached without a valid MAC under this host's key
    (a host with another [tls] session_key_file, or forged), which are not listed."""
    names = ", ".join(f"{h['address']}:{h['port']} ({h['host']})" for h in hosts) or "none"
    foreign = (f"; {rejected} record(s) not MACed under this host's cluster key ignored (a host with another "
               "[tls] session_key_file, or forged): copy the key file from one host to all, then reload") if rejected else ""  # fmt: skip
    out = [Result("hosts", len(hosts) >= max(expect, 1) and not rejected, f"{len(hosts)} host(s) in memcached: {names}"
                  + (f"; expected {expect}" if len(hosts) < expect else "") + foreign)]  # fmt: skip
    if cfg.tls.enabled and not hosts:
        out.append(Result("session keys", False, "no host in memcached to compare this host's key with"))
    elif cfg.tls.enabled:
        mine = key_fingerprint(cfg)
        keys = {h["host"]: h.get("key") or "" for h in hosts}
        differ = [f"{h} has {k or 'no key'}" for h, k in keys.items() if k != mine]
        out.append(Result("session keys", bool(mine) and not differ,
                          f"every host has key {mine}" if mine and not differ else
                          f"this host has {mine or 'no key'}; " + "; ".join(differ) + " (copy [tls] session_key_file from one host to all, then reload)"))  # fmt: skip
    return out


def _refused(h: dict[str, Any], user: str, source: str, ctx: ssl.SSLContext) -> tuple[bool, str]:
    """One session: USER/PASS of the banned name. (True, text) when refused by the ban."""
    f = _connect(h["address"], h["port"], source, bool(h.get("tls")), ctx)
    try:
        f.sendcmd(f"USER {user}")
        try:
            f.sendcmd("PASS " + secrets.token_hex(8))
            return False, "logged in?"
        except ftplib.error_perm as e:
            text = str(e)
            return "Login incorrect" not in text, text
    finally:
        try:
            f.quit()
        except (OSError, EOFError, ftplib.Error):
            f.close()


def _failure(cfg: Config, e: BaseException) -> str:
    """An exception as a result's detail; a connection closed before any greeting from
    a host that speaks the PROXY protocol usually means this address is a trusted
    balancer there (a header is then required), so say how to check from another."""
    text = f"{type(e).__name__}: {e}"
    if cfg.proxy_protocol.enabled and isinstance(e, (EOFError, ConnectionResetError)):
        text += (" (the host closed the connection: with [proxy_protocol] enabled it expects a PROXY header from "
                 "its trusted addresses; if this host's address is one of them, run the check with --source "
                 "ADDRESS, an address of this host that is not trusted)")  # fmt: skip
    return text


def check_ban(cfg: Config, hosts: list[dict[str, Any]], control: Callable[[dict[str, Any]], dict[str, Any]], source: str) -> list[Result]:
    user = f"cluster-check-{secrets.token_hex(4)}"
    reply = control({"cmd": "ban", "kind": "user", "name": user, "duration": 60, "reason": "ftpcluster cluster check"})
    if not reply.get("ok"):
        return [Result("ban propagation", False, f"could not ban a test user here: {reply.get('error')}")]
    ctx = _context()
    t0 = time.monotonic()
    out = []
    try:
        time.sleep(min(2.0, 2 * cfg.memcache.sync_interval + 0.5))  # usually one probe per host is enough
        for h in hosts:
            where = f"{h['address']}:{h['port']}"
            last = ""
            deadline = t0 + REFUSAL_WAIT
            while True:
                try:
                    refused, last = _refused(h, user, source, ctx)
                except (OSError, EOFError, ftplib.Error, ssl.SSLError) as e:
                    refused, last = False, _failure(cfg, e)
                if refused or time.monotonic() >= deadline:
                    break
                time.sleep(1.0)
            took = time.monotonic() - t0
            out.append(Result(f"ban propagation to {where}", refused,
                              f"refused {took:.1f} s after the ban: {last}" if refused else f"not refused within {REFUSAL_WAIT:.0f} s: {last}"))  # fmt: skip
    finally:
        control({"cmd": "permit", "kind": "user", "name": user})
    return out


def _session_from(host: str, port: int, source: str, ctx: ssl.SSLContext, offer: Any = None) -> tuple[ssl.SSLSession | None, bool, str]:
    """Log in to nowhere: AUTH TLS, NOOP (the TLS 1.3 ticket arrives), QUIT."""
    f = _connect(host, port, source, True, ctx, offer)
    try:
        f.voidcmd("NOOP")
        sock = f.sock
        assert isinstance(sock, ssl.SSLSocket)
        return sock.session, sock.session_reused, str(sock.version())
    finally:
        try:
            f.quit()
        except (OSError, EOFError, ftplib.Error):
            f.close()


def check_tls(cfg: Config, hosts: list[dict[str, Any]], balancer: str, source: str) -> list[Result]:
    if not cfg.tls.enabled:
        return []
    ctx = _context()
    first = parse_hostport(balancer) if balancer else (hosts[0]["address"], hosts[0]["port"]) if hosts else None
    if first is None:
        return [Result("TLS resumption", False, "no host to connect to")]
    origin = "the balancer" if balancer else f"{first[0]}:{first[1]}"
    try:
        session, _, version = _session_from(first[0], first[1], source, ctx)
    except (OSError, EOFError, ftplib.Error, ssl.SSLError, AssertionError) as e:
        return [Result("TLS resumption", False, f"no TLS session from {origin}: {_failure(cfg, e)}")]
    targets = [(f"{h['address']}:{h['port']}", h["address"], h["port"]) for h in hosts]
    if balancer:
        targets.append((f"balancer {balancer}", *first))
    out = []
    for name, host, port in targets:
        try:
            _, reused, v = _session_from(host, port, source, ctx, session)
            out.append(Result(f"TLS resumption on {name}", reused, f"session from {origin} {'resumed' if reused else 'NOT resumed (full handshake)'} ({v})"))
        except (OSError, EOFError, ftplib.Error, ssl.SSLError, AssertionError) as e:
            out.append(Result(f"TLS resumption on {name}", False, _failure(cfg, e)))
    return out


def run(cfg: Config, control: Callable[[dict[str, Any]], dict[str, Any]], balancer: str = "", expect: int = 0, source: str = "") -> list[Result]:
    if not cfg.memcache.enabled:
        return [Result("memcached", False, "[memcache] enabled = false: this host is not part of a cluster")]

    results = check_memcached(cfg)
    ring = Ring(cfg)
    rejected: list[str] = []
    try:
        mac = load_record_mac(cfg, ring.prefix, count=lambda name, labels: rejected.append(labels[0]))
        mac.log_every = 1e9  # said in the result instead
        hosts = read_hosts(ring, mac)
    except SealError as e:
        return results + [Result("hosts", False, f"no cluster key: {e} (ftpcluster key generate, the same file on every host)")]
    finally:
        ring.close()
    results += check_hosts(cfg, hosts, expect, rejected=len(rejected))
    if hosts and cfg.ban_uses_memcache:
        results += check_ban(cfg, hosts, control, source)
    elif hosts:
        results.append(Result("ban propagation", True, "skipped: bans are not shared ([ban] enabled and cache = \"memcache\" share them)"))
    results += check_tls(cfg, hosts, balancer, source)
    return results


def as_json(results: list[Result]) -> dict[str, Any]:
    return {"ok": all(r.ok for r in results), "checks": [asdict(r) for r in results]}


def render(results: list[Result]) -> str:
    return "\n".join(f"{'ok  ' if r.ok else 'FAIL'}  {r.check}: {r.detail}" for r in results)

