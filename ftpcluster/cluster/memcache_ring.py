"""memcached servers on a ketama ring (uhashring) with replicas, ejection and probing.

- Each key lives on `replicas` distinct servers: the first ones clockwise from the
  key's point on the ring, skipping servers that are down, so a down server's
  keys move to the next server and come back when it does.
- A server that fails `connect_failures` times in a row is ejected and probed
  (a `version` call) every `probe_interval` until it answers (ProFTPD parses
  MemcacheConnectFailures and never uses it).
- With a HealthChecker (memcache_health.py) the ring also skips servers the
  checker finds down (a hung server costs no timeout once it is seen) and takes
  an ejected server back as soon as the checker saw it answer after the
  ejection; the checker's own thread does the probing then.
- Every call has the short timeouts of `[memcache]`; an error is a miss or a
  lost write for the caller, never an exception.
- Not thread-safe: one Ring per thread (the supervisor's loop, or a node's
  single memcached worker thread).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import structlog
from pymemcache.client.base import Client
from uhashring import HashRing

from ..config import Config, parse_hostport

trace = structlog.get_logger("ftpcluster.trace.memcache")
log = structlog.get_logger("ftpcluster.memcache")
Count = Callable[[str, tuple[str, ...]], None]


@dataclass
class Server:
    address: str
    client: Client
    up: bool = True
    failures: int = 0  # consecutive
    errors: int = 0  # total
    next_probe: float = 0.0
    last_error: str = ""
    ejected_at: float = 0.0  # monotonic
    ejected_since: float | None = None  # wall clock, for status
    epoch: int = 0  # the health checker's epoch last seen
    ops: dict[str, int] = field(default_factory=dict)


def key_prefix(cfg: Config) -> str:
    """What every key of this cluster starts with (namespaced and versioned)."""
    return f"{cfg.memcache.namespace}:v1:"


class Ring:
    def __init__(self, cfg: Config, count: Count | None = None, health: Any = None) -> None:
        m = cfg.memcache
        self.health = health  # a HealthChecker, or None (then probe() calls `version` itself)
        self.replicas = max(1, m.replicas)
        self.connect_failures = max(1, m.connect_failures)
        self.probe_interval = m.probe_interval
        self.prefix = key_prefix(cfg)
        self.count: Count = count or (lambda name, labels: None)
        self.servers: dict[str, Server] = {}
        for addr in m.servers:
            host, port = parse_hostport(addr, "memcache.servers")
            client = Client((host, port), connect_timeout=m.timeout, timeout=m.timeout, no_delay=True,
                            default_noreply=False)  # fmt: skip
            self.servers[addr] = Server(addr, client)
        self.ring = HashRing(nodes=list(self.servers), hash_fn="ketama")
        self.rejoins = 0  # bumped when an ejected server comes back (it may have lost its data)

    # ------------------------------------------------------------ placement
    def key(self, name: str) -> str:
        return self.prefix + name

    def _live(self, s: Server) -> bool:
        """Not ejected by the ring, not down by the health checker's verdict."""
        return s.up and not (self.health is not None and self.health.is_down(s.address))

    def targets(self, name: str) -> list[Server]:
        out: list[Server] = []
        if not self.servers:
            return out
        for node in self.ring.range(self.key(name), size=None, unique=True):
            s = self.servers[node["nodename"] if isinstance(node, dict) else node]
            if self._live(s):
                out.append(s)
                if len(out) == self.replicas:
                    break
        return out

    # ------------------------------------------------------------ one call
    def _call(self, s: Server, op: str, fn: Callable[[Client], Any]) -> tuple[bool, Any]:
        try:
            result = fn(s.client)
        except Exception as e:  # pymemcache errors, socket errors, timeouts
            s.failures += 1
            s.errors += 1
            s.last_error = f"{type(e).__name__}: {e}"[:200]
            self.count("ftpcluster_memcache_errors_total", (s.address,))
            trace.debug("memcache error", server=s.address, op=op, error=s.last_error)
            with _quiet():
                s.client.close()
            if s.failures >= self.connect_failures and s.up:
                s.up = False
                s.ejected_at = time.monotonic()
                s.ejected_since = time.time()
                s.next_probe = s.ejected_at + self.probe_interval
                log.warning("memcached server ejected", server=s.address, failures=s.failures, error=s.last_error)
            return False, None
        s.failures = 0
        s.ops[op] = s.ops.get(op, 0) + 1
        self.count("ftpcluster_memcache_operations_total", (s.address, op))
        return True, result

    # ------------------------------------------------------------ operations
    def get(self, name: str, next_on_miss: bool = True) -> bytes | None:
        """From the first live replica that has it: a replica that restarted empty (or
        missed a write while it was ejected) does not hide the copy on the next one.
        `next_on_miss=False`: the first replica's answer, miss or not (a counter, which
        lives on the first live replica only)."""
        k = self.key(name)
        for s in self.targets(name):
            ok, v = self._call(s, "get", lambda c: c.get(k))
            if ok and (v is not None or not next_on_miss):
                return v
        return None

    def get_many(self, names: Iterable[str]) -> dict[str, bytes]:
        """As get() for each name: one get_many per server and replica rank, the names
        a replica did not have (or that failed there) asked of the next replica."""
        out: dict[str, bytes] = {}
        todo = list(names)
        plen = len(self.prefix)
        for rank in range(self.replicas):
            by_server: dict[str, list[str]] = {}
            for n in todo:
                t = self.targets(n)
                if len(t) > rank:
                    by_server.setdefault(t[rank].address, []).append(n)
            for addr, group in by_server.items():
                keys = [self.key(n) for n in group]
                ok, got = self._call(self.servers[addr], "get", lambda c: c.get_many(keys))
                if ok and got:
                    out.update({k[plen:]: v for k, v in got.items()})
            todo = [n for n in todo if n not in out]
            if not todo:
                break
        return out

    def missing(self, names: Iterable[str]) -> set[str]:
        """The names none of their replicas holds, every replica asked (one get_many per
        server). Empty unless every server is up and answers: a server that is down, or
        stood in for by another, may hold the only copy."""
        if not self.servers or not all(self._live(s) for s in self.servers.values()):
            return set()
        names = list(names)
        by_server: dict[str, list[str]] = {}
        for n in names:
            for s in self.targets(n):
                by_server.setdefault(s.address, []).append(n)
        held: set[str] = set()
        plen = len(self.prefix)
        for addr, group in by_server.items():
            keys = [self.key(n) for n in group]
            ok, got = self._call(self.servers[addr], "get", lambda c: c.get_many(keys))
            if not ok:
                return set()
            held.update(k[plen:] for k in (got or {}))
        return set(names) - held

    def set(self, name: str, value: bytes, ttl: int) -> int:
        """Write to every replica; returns how many took it."""
        k, n = self.key(name), 0
        for s in self.targets(name):
            ok, _ = self._call(s, "set", lambda c: c.set(k, value, expire=max(0, int(ttl)), noreply=False))
            n += int(ok)
        return n

    def delete(self, name: str) -> int:
        k, n = self.key(name), 0
        for s in self.targets(name):
            ok, _ = self._call(s, "delete", lambda c: c.delete(k, noreply=False))
            n += int(ok)
        return n

    def incr(self, name: str, by: int = 1, ttl: int = 0) -> int | None:
        """Counter on the first live replica (counters are not replicated: a lost
        server loses a few counts, never a ban)."""
        k = self.key(name)
        for s in self.targets(name):  # the first live replica; the next one if it fails
            ok, v = self._call(s, "incr", lambda c: c.incr(k, by, noreply=False))
            if ok and v is None:
                ok, _ = self._call(s, "add", lambda c: c.add(k, b"0", expire=ttl, noreply=False))
                ok, v = self._call(s, "incr", lambda c: c.incr(k, by, noreply=False))
            if ok and v is not None:
                return int(v)
        return None

    def update(self, name: str, fn: Callable[[bytes | None], bytes], ttl: int = 0, tries: int = 5) -> int:
        """Read-modify-write with gets/cas on every replica (a shared index)."""
        k, n = self.key(name), 0
        for s in self.targets(name):
            for _ in range(tries):
                ok, got = self._call(s, "get", lambda c: c.gets(k))
                if not ok:
                    break
                value, token = got if got else (None, None)
                new = fn(value)
                if token is None:
                    ok, stored = self._call(s, "add", lambda c: c.add(k, new, expire=ttl, noreply=False))
                else:
                    ok, stored = self._call(s, "cas", lambda c: c.cas(k, new, token, expire=ttl, noreply=False))
                if not ok:
                    break
                if stored:
                    n += 1
                    break
        return n

    # ------------------------------------------------------------ health
    def probe(self, now: float | None = None) -> None:
        """Try ejected servers whose probe is due; a server that answers rejoins.
        With a health checker: take back what it saw answer since the ejection, and
        count a server it saw come back as a rejoin (it may have lost its data)."""
        now = time.monotonic() if now is None else now
        if self.health is not None:
            self._follow_health()
            return
        for s in self.servers.values():
            if s.up or now < s.next_probe:
                continue
            try:
                s.client.version()
            except Exception as e:
                s.next_probe = now + self.probe_interval
                s.last_error = f"{type(e).__name__}: {e}"[:200]
                with _quiet():
                    s.client.close()
                continue
            s.up, s.failures, s.ejected_since = True, 0, None
            self.rejoins += 1
            log.warning("memcached server back in the ring", server=s.address)

    def _follow_health(self) -> None:
        h = self.health
        for s in self.servers.values():
            epoch = h.epoch(s.address)
            if epoch != s.epoch:
                s.epoch = epoch
                self.rejoins += 1
            if not s.up and h.last_ok(s.address) > s.ejected_at:
                s.up, s.failures, s.ejected_since = True, 0, None
                self.rejoins += 1
                log.info("memcached server back in the ring", server=s.address)

    def status(self) -> list[dict[str, Any]]:
        """Per server: up (the health checker's verdict when there is one, else the
        ring's), last error, latency of the last check, since when it is down."""
        out = []
        verdicts = {v["address"]: v for v in self.health.status()} if self.health is not None else {}
        for s in self.servers.values():
            v = verdicts.get(s.address, {})
            up = v["up"] and s.up if v else s.up
            since = v.get("down_since") if v and not v["up"] else s.ejected_since
            out.append({"address": s.address, "up": up, "errors": s.errors, "consecutive_failures": s.failures,
                        "last_error": v.get("last_error") or s.last_error or None, "latency_ms": v.get("latency_ms"),
                        "ejected_since": None if up else since})  # fmt: skip
        return out

    def any_up(self) -> bool:
        return any(self._live(s) for s in self.servers.values())

    def close(self) -> None:
        for s in self.servers.values():
            with _quiet():
                s.client.close()


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return True
