"""Revoking a user's cached TLS sessions when the user is banned.

Nodes remember which session ids each user's control connections used (the
last few per user, in the host's shared memory and, with memcached, under a
per-user key); when a user or user@host ban appears, the supervisor deletes
those sessions from both levels, so a banned user's client cannot resume them
anywhere. Sessions resumed through tickets carry no id and cannot be revoked
this way: they expire with the ticket key epoch (an hour).

The list in memcached carries a MAC (record_mac.py, kind "tlsuser"): a forged
list cannot make a ban on one user delete other users' sessions."""

from __future__ import annotations

import hashlib
from typing import Any

from .record_mac import server_of

MAX_IDS = 16
ID_MAX = 64


def user_key(user: str) -> bytes:
    return b"tlsuser:" + hashlib.blake2b(user.encode("utf-8", "replace"), digest_size=12).digest()


def memcache_name(user: str) -> str:
    return "tlsuser:" + hashlib.blake2b(user.encode("utf-8", "replace"), digest_size=12).hexdigest()


def pack_ids(ids: list[bytes]) -> bytes:
    return b"".join(bytes([len(i)]) + i for i in ids[-MAX_IDS:] if 0 < len(i) <= ID_MAX)


def unpack_ids(raw: bytes | None) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while raw and i < len(raw) and len(out) < MAX_IDS:
        n = raw[i]
        if n == 0 or n > ID_MAX or i + 1 + n > len(raw):
            break
        out.append(bytes(raw[i + 1 : i + 1 + n]))
        i += 1 + n
    return out


def _listed(raw: bytes | None, session_id: bytes) -> bool:
    """`session_id in unpack_ids(raw)`, without building the list: each resumed login
    asks this, and the answer is almost always yes."""
    if not raw or not 0 < len(session_id) <= ID_MAX:
        return False
    entry = bytes((len(session_id),)) + session_id
    at = raw.find(entry)
    if at < 0:
        return False
    i = n = 0
    while i < at and n < MAX_IDS:  # is `at` where an entry starts?
        size = raw[i]
        if size == 0 or size > ID_MAX:
            return False
        i += 1 + size
        n += 1
        if i > at:
            at = raw.find(entry, i)  # that match was inside an entry: the next one
            if at < 0:
                return False
    return i == at and n < MAX_IDS


def remember(l1: Any, user: str, session_id: bytes, ttl: float) -> bytes | None:
    """Add an id to the user's list in L1; returns the packed list (for L2), or None
    when the id is there already (a resumed session: nothing to write, here or in
    memcached, on every login)."""
    key = user_key(user)
    raw = l1.get(key)
    if _listed(raw, session_id):
        return None
    ids = unpack_ids(raw)
    ids.append(session_id)
    packed = pack_ids(ids)
    l1.put(key, packed, ttl)
    return packed


def tombstone_key(session_id: bytes) -> bytes:
    return b"tlsrevoked:" + session_id


def revoked(l1: Any, session_id: bytes) -> bool:
    """Was this session revoked on this host (a tombstone in L1)?"""
    return l1.get(tombstone_key(session_id)) is not None


def revoke_user(user: str, l1: Any, ring: Any = None, mac: Any = None, ttl: float = 3600.0) -> int:
    """Delete every remembered session of `user` from L1 and L2 (`ring` with its
    RecordMac `mac`); returns how many ids. Each id first gets a tombstone in L1 for
    `ttl` (the session lifetime): a prefetch that read the session from memcached
    before the delete, and puts it into L1 after it, checks the tombstone after its
    put and takes the session out again (TwoLevelStore._fetch); so does a fetch from
    a replica that missed the delete."""
    ids = set(unpack_ids(l1.get(user_key(user)) if l1 is not None else None))
    if ring is not None and mac is not None:
        name = memcache_name(user)
        ids |= set(unpack_ids(mac.open("tlsuser", name, ring.get(name), server_of(ring, name))))
    for sid in ids if l1 is not None else ():
        l1.put(tombstone_key(sid), b"\x01", ttl)
    # memcached first: a handshake on this host between the two deletes would
    # otherwise fetch the session back into L1 (prefetch on an L1 miss).
    for sid in ids if ring is not None else ():
        ring.delete("tls:" + sid.hex())
    for sid in ids if l1 is not None else ():
        l1.delete(sid)
    if l1 is not None:
        l1.delete(user_key(user))
    # The list in memcached stays until its TTL: other hosts revoke from it too.
    return len(ids)
