"""A health checker for the memcached servers: one thread per process.

Why: a server is otherwise marked down only when an operation on it fails, so
with no traffic `status` keeps showing a dead or hung server as up, and a ring
that ejected a server never learns it is back unless it probes it itself. Here
every server gets a cheap `version` with a short deadline every
`probe_interval` whether or not traffic touches it, off any event loop; a
failed check is repeated after RETRY seconds and two failures in a row mark
the server down, so a hung server shows down within about two seconds and a
restarted one up within one interval.

Rings read the verdicts (`is_down`, `epoch`) to skip a down server and to take
an ejected one back; `status()` gives address, up, last error, latency and
since when a server is down. Reads from other threads need no lock: every
field is replaced by a single assignment."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog
from pymemcache.client.base import Client

from ..config import Config, parse_hostport

log = structlog.get_logger("ftpcluster.memcache")
RETRY = 0.2  # seconds before a failed check is repeated
FAILS_DOWN = 2  # failed checks in a row that mark a server down
MAX_CHECK_TIMEOUT = 0.5


@dataclass
class Verdict:
    address: str
    up: bool = True
    checked: bool = False  # at least one check done
    fails: int = 0
    last_error: str = ""
    latency_ms: float | None = None
    down_since: float | None = None  # wall clock
    last_ok: float = 0.0  # monotonic
    epoch: int = 0  # bumped on every down -> up transition (the server may have lost its data)


class HealthChecker:
    def __init__(self, cfg: Config, interval: float | None = None) -> None:
        m = cfg.memcache
        self.interval = max(0.05, interval if interval is not None else m.probe_interval)
        self.timeout = max(0.01, min(m.timeout, MAX_CHECK_TIMEOUT))
        self.verdicts: dict[str, Verdict] = {a: Verdict(a) for a in m.servers}
        self._clients: dict[str, Client] = {}
        for addr in m.servers:
            host, port = parse_hostport(addr, "memcache.servers")
            self._clients[addr] = Client((host, port), connect_timeout=self.timeout, timeout=self.timeout, no_delay=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "HealthChecker":
        if self._thread is None and self.verdicts:
            self._thread = threading.Thread(target=self._run, name="memcache-health", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for c in self._clients.values():
            try:
                c.close()
            except Exception:
                pass

    # ------------------------------------------------------------ reading (any thread)
    def is_down(self, address: str) -> bool:
        v = self.verdicts.get(address)
        return v is not None and not v.up

    def epoch(self, address: str) -> int:
        v = self.verdicts.get(address)
        return v.epoch if v is not None else 0

    def last_ok(self, address: str) -> float:
        v = self.verdicts.get(address)
        return v.last_ok if v is not None else 0.0

    def status(self) -> list[dict[str, Any]]:
        return [
            {"address": v.address, "up": v.up, "checked": v.checked, "last_error": v.last_error or None,
             "latency_ms": v.latency_ms, "down_since": v.down_since}  # fmt: skip
            for v in self.verdicts.values()
        ]

    # ------------------------------------------------------------ the thread
    def check(self, address: str) -> bool:
        """One `version` on `address`; updates its verdict. True when it answered."""
        v, client = self.verdicts[address], self._clients[address]
        t0 = time.monotonic()
        try:
            client.version()
        except Exception as e:  # refused, reset, timeout: all mean "not serving"
            try:
                client.close()
            except Exception:
                pass
            v.checked = True
            v.fails += 1
            v.last_error = f"{type(e).__name__}: {e}"[:200] or type(e).__name__
            if v.up and v.fails >= FAILS_DOWN:
                v.down_since = time.time()
                v.up = False
                log.warning("memcached server down", server=address, error=v.last_error)
            return False
        now = time.monotonic()
        v.latency_ms = round((now - t0) * 1000, 3)
        v.checked, v.fails, v.last_ok = True, 0, now
        if not v.up:
            v.epoch += 1
            v.up, v.down_since = True, None
            log.warning("memcached server up again", server=address)
        return True

    def _run(self) -> None:
        next_at = {a: 0.0 for a in self.verdicts}
        while not self._stop.is_set():
            now = time.monotonic()
            for addr in self.verdicts:
                if now >= next_at[addr]:
                    ok = self.check(addr)
                    next_at[addr] = time.monotonic() + (self.interval if ok or self.verdicts[addr].fails >= FAILS_DOWN else RETRY)
            wait = min(next_at.values()) - time.monotonic()
            self._stop.wait(max(0.01, wait))
