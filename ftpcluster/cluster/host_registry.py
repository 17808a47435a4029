"""Which hosts form the cluster, as memcached knows it: each supervisor publishes a
small record about itself every few seconds, so `ftpcluster cluster check` on any
host can find every other host, compare their session-key fingerprints (never
the key) and probe each one directly.

- `host:<host id>`: JSON {host, hostname, address, port, implicit_port, tls,
  key, version, time}; TTL 30 s, so a stopped host disappears.
- `hosts`: JSON {host id: last seen}, updated with gets/cas; entries not seen
  for a minute are dropped on the next update.
Everything read back is validated, and both carry a MAC under the cluster key
(record_mac.py, kind "host"): a host record anyone could write would point
`cluster check` at addresses of their choosing. A host with another cluster
key is therefore not listed; its records count as rejected."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from .. import __version__
from ..config import Config, parse_hostport
from .memcache_ring import Ring
from .record_mac import Count, RecordMac, load_record_mac, server_of
from .session_seal import SealError, fingerprint, load_sealer

PUBLISH_EVERY = 5.0
READ_EVERY = 1.0
RECORD_TTL = 30
FORGET_AFTER = 60.0
MAX_VALUE = 4096
MAX_HOSTS = 256


def key_fingerprint(cfg: Config) -> str:
    """The non-secret id of this host's current session key, or "" without one."""
    try:
        return fingerprint(load_sealer(cfg.resolve(cfg.tls.session_key_file)))
    except SealError:
        return ""


def advertised_address(cfg: Config) -> str:
    """The address other hosts reach this one at: the listen address, or for a
    wildcard listener the source address this host uses towards memcached."""
    host, _ = cfg.listen_address
    if host not in ("0.0.0.0", "::", ""):
        return host
    for server in cfg.memcache.servers:
        mhost, mport = parse_hostport(server)
        try:
            with socket.socket(socket.AF_INET6 if ":" in mhost else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((mhost, mport))  # UDP: no packet is sent, the kernel just picks a route
                return s.getsockname()[0]
        except OSError:
            continue
    return socket.gethostname()


def _parse(raw: Any, limit: int = MAX_VALUE) -> Any:
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > limit:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _index_update(raw: bytes | None, host: str, now: float) -> bytes:
    got = _parse(raw, MAX_VALUE * 8)
    seen = {k: v for k, v in got.items() if isinstance(k, str) and isinstance(v, (int, float))} if isinstance(got, dict) else {}
    seen = {k: v for k, v in seen.items() if now - v < FORGET_AFTER}
    seen[host] = now
    if len(seen) > MAX_HOSTS:
        seen = dict(sorted(seen.items(), key=lambda kv: -kv[1])[:MAX_HOSTS])
    return json.dumps(seen, separators=(",", ":")).encode()


class HostRegistry:
    """The supervisor's side: publish this host's record now and then (its own Ring:
    a Ring belongs to one thread)."""

    def __init__(self, cfg: Config, host_id: str, count: Count | None = None) -> None:
        self.cfg = cfg
        self.host_id = host_id
        self.ring = Ring(cfg)
        self.mac: RecordMac | None = None
        try:
            self.mac = load_record_mac(cfg, self.ring.prefix, count)
        except SealError:
            pass  # start refuses [memcache] without a cluster key (preflight); nothing to publish
        self.next_publish = self.next_read = 0.0
        self.hosts: list[dict[str, Any]] = []  # what the last read found, for status
        _, port = cfg.listen_address
        imp = cfg.implicit_tls_address
        self.record = {
            "v": 1, "host": host_id, "hostname": socket.gethostname()[:64], "address": advertised_address(cfg),
            "port": port, "implicit_port": imp[1] if imp else None, "tls": cfg.tls.enabled,
            "key": key_fingerprint(cfg) if cfg.tls.enabled else "", "version": __version__,
        }  # fmt: skip

    def tick(self, now: float) -> None:
        if now < self.next_read:
            return
        self.next_read = now + READ_EVERY
        self.ring.probe(now)
        mac = self.mac
        if mac is None:
            return
        if now >= self.next_publish:
            self.next_publish = now + PUBLISH_EVERY
            wall = time.time()
            value = json.dumps({**self.record, "time": wall}, separators=(",", ":")).encode()
            name = f"host:{self.host_id}"
            self.ring.set(name, mac.seal(name, value), RECORD_TTL)
            self.ring.update("hosts", lambda raw: mac.seal("hosts", _index_update(
                mac.open("host", "hosts", raw, server_of(self.ring, "hosts")), self.host_id, wall)))  # fmt: skip
        self.hosts = read_hosts(self.ring, mac)  # fresh for `status` and the hosts a ban reaches

    def status(self) -> dict[str, Any]:
        return {"cluster": {"host_id": self.host_id, "key_fingerprint": self.record["key"],
                            "hosts": [h["host"] for h in self.hosts]}}  # fmt: skip

    def withdraw(self) -> None:
        """A stopping host takes its record out at once (it would stay RECORD_TTL), so
        `ban` and `cluster check` elsewhere stop counting it."""
        try:
            self.ring.delete(f"host:{self.host_id}")
        except Exception:  # memcached down: the record expires on its own
            pass

    def close(self) -> None:
        self.ring.close()


def read_hosts(ring: Ring, mac: RecordMac) -> list[dict[str, Any]]:
    """Every host record in force, validated and MACed under this cluster's key."""
    index = _parse(mac.open("host", "hosts", ring.get("hosts"), server_of(ring, "hosts")), MAX_VALUE * 8)
    if not isinstance(index, dict):
        return []
    names = [k for k in list(index)[:MAX_HOSTS] if isinstance(k, str) and 0 < len(k) <= 64]
    got = ring.get_many(f"host:{n}" for n in names)
    out = []
    for name in names:
        key = f"host:{name}"
        rec = _parse(mac.open("host", key, got.get(key), server_of(ring, key)))
        if not isinstance(rec, dict) or rec.get("v") != 1 or rec.get("host") != name:
            continue
        if not isinstance(rec.get("address"), str) or not isinstance(rec.get("port"), int):
            continue
        out.append({k: rec.get(k) for k in ("host", "hostname", "address", "port", "implicit_port", "tls", "key", "version", "time")})
    return sorted(out, key=lambda r: str(r["address"]))
