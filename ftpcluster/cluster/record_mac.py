"""Every record ftpcluster reads back from memcached and acts on carries a MAC.

memcached has no authentication: anything that reaches it can write any key.
So each value we later believe (ban records and removals, change-log entries,
index shards, TLS revocation lists) is stored as

    m1.<key id: 8 hex>.<tag: 32 hex>.<payload>

where the tag is keyed BLAKE2b-128 over the header, the record's full
memcached key name (namespace included) and the payload. A forged value, a
valid one copied to another key (another ban, a later change-log sequence
number, another namespace) or an edited payload (a changed expiry) fails; the
payload stays readable for an operator looking at memcached.

The MAC key is derived by HKDF from the cluster key (`[tls] session_key_file`,
label "records"), one per secret in the file, so rotation works as for sealed
TLS sessions: the current secret writes; a retired one is still accepted for
`[tls] session_key_overlap` after its retirement stamp.

A record that fails is a miss for the caller, counted in
`ftpcluster_memcache_rejected_total{kind}` and logged at most once per
interval with the server that served it.

Counters (memcached incr) cannot carry a MAC: their key names are a keyed hash
of the event and client (`counter_name`), so nobody without the cluster key
can name, read or inflate the counter of a given address.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Callable

import structlog

from ..config import Config
from .session_seal import Secret, derive, load_secrets

log = structlog.get_logger("ftpcluster.memcache")
Count = Callable[[str, tuple[str, ...]], None]
MAGIC = b"m1."
HEAD = len(MAGIC) + 8 + 1 + 32 + 1  # "m1." id "." tag "."
REJECTED = "ftpcluster_memcache_rejected_total"
LOG_EVERY = 60.0


class RecordMac:
    """MACs records under the current secret; verifies under any secret still accepted."""

    def __init__(self, secrets_: list[Secret], prefix: str, overlap: float | None = None, count: Count | None = None,
                 log_every: float = LOG_EVERY) -> None:  # fmt: skip
        if not secrets_:
            raise ValueError("no secret")
        self.prefix = prefix.encode()
        self.current_id = secrets_[0].key_id
        self._keys = {s.key_id: derive(s.material, "records", 0, 32) for s in secrets_}
        self._until = {s.key_id: s.accepted_until(overlap) for s in secrets_[1:]}
        self.counter_key = derive(secrets_[0].material, "counter-names", 0, 32)
        self.count: Count = count or (lambda name, labels: None)
        self.log_every = log_every
        self.rejected: dict[tuple[str, str], int] = {}  # (kind, server) -> since the last log line
        self._next_log = 0.0

    def _tag(self, key: bytes, head: bytes, name: str, payload: bytes) -> bytes:
        h = hashlib.blake2b(head, key=key, digest_size=16)
        h.update(self.prefix + name.encode() + b"\0")
        h.update(payload)
        return h.hexdigest().encode()

    def seal(self, name: str, payload: bytes) -> bytes:
        """The value to store under `name` (the ring's name, without the namespace prefix)."""
        head = MAGIC + b"%08x." % self.current_id
        return head + self._tag(self._keys[self.current_id], head, name, payload) + b"." + payload

    def verify(self, name: str, raw: object) -> bytes | None:
        """The payload when `raw` was sealed for `name` under an accepted secret, else None."""
        if not isinstance(raw, (bytes, bytearray)) or len(raw) < HEAD or raw[:3] != MAGIC or raw[HEAD - 1] != 0x2E:
            return None
        head = bytes(raw[: len(MAGIC) + 9])
        try:
            key_id = int(head[3:11], 16)
        except ValueError:
            return None
        key = self._keys.get(key_id)
        if key is None or (key_id in self._until and time.time() >= self._until[key_id]):
            return None
        payload = bytes(raw[HEAD:])
        if not hmac.compare_digest(self._tag(key, head, name, payload), bytes(raw[len(head) : HEAD - 1])):
            return None
        return payload

    def retired(self, raw: object) -> bool:
        """Sealed under a key other than the current one (call after verify() passed):
        a record to seal again before the overlap ends, or it will be refused then."""
        return isinstance(raw, (bytes, bytearray)) and bytes(raw[3:11]) != b"%08x" % self.current_id

    def open(self, kind: str, name: str, raw: object, server: str = "") -> bytes | None:
        """verify(), and a value that fails is counted and logged (None in = a plain miss)."""
        if raw is None:
            return None
        payload = self.verify(name, raw)
        if payload is None:
            self.reject(kind, server)
        return payload

    def reject(self, kind: str, server: str = "") -> None:
        self.count(REJECTED, (kind,))
        k = (kind, server)
        self.rejected[k] = self.rejected.get(k, 0) + 1
        now = time.monotonic()
        if now < self._next_log:
            return
        self._next_log = now + self.log_every
        for (kind_, server_), n in sorted(self.rejected.items()):
            log.warning("memcached records without a valid MAC ignored (written by something without the "
                        "cluster key)", kind=kind_, server=server_ or None, count=n, interval=self.log_every)  # fmt: skip
        self.rejected.clear()

    def counter_name(self, text: str) -> str:
        """A counter's key name: nobody without the cluster key can compute it."""
        return hashlib.blake2b(text.encode(), key=self.counter_key, digest_size=12).hexdigest()


def load_record_mac(cfg: Config, prefix: str, count: Count | None = None) -> RecordMac:
    """From the cluster key file `[tls] session_key_file` (SealError when missing or malformed);
    `prefix` is the ring's key prefix (namespace), bound into every MAC."""
    return RecordMac(load_secrets(cfg.resolve(cfg.tls.session_key_file)), prefix, cfg.tls.session_key_overlap, count)


def server_of(ring: object, name: str) -> str:
    """The server a read of `name` asks first (for the log line of a rejected record)."""
    try:
        targets = ring.targets(name)  # type: ignore[attr-defined]
        return targets[0].address if targets else ""
    except Exception:
        return ""
