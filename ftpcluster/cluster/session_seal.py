"""The cluster secret: seals cached TLS sessions and derives ticket keys.

A serialized TLS session holds its master secret, so anything that leaves a
process for memcached is sealed with AES-256-GCM under a key derived from the
cluster secret. Every sealed value starts with a key id, so the secret can be
rotated: the key file holds the current secret first and older ones after it;
values sealed under an old one still open until it is dropped from the file.
A value that fails to open (wrong key, truncated, tampered, foreign) is a miss,
never an exception for the caller.

Key file format: one secret per line, ``<id> <64 hex chars> [retired=<unix s>]``;
'#' comments. `ftpcluster key generate` stamps the secret it replaces with the
time it stopped being current; a retired secret is accepted for `overlap`
seconds after that (``[tls] session_key_overlap``), then refused even while it
is still in the file, so a rotation ends on its own.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"FCs1"
NONCE = 12
TAG = 16
HEADER = struct.Struct("!4sI")  # magic, key id
MAX_SEALED = 16 * 1024  # a TLS session with a cert chain fits; more is refused


class SealError(ValueError):
    """The key file is missing or malformed."""


@dataclass(frozen=True)
class Secret:
    key_id: int
    material: bytes  # 32 bytes
    retired: float | None = None  # unix seconds it stopped being current; None = current or unstamped

    def accepted_until(self, overlap: float | None) -> float:
        """Until when values under this secret are believed (inf: no limit)."""
        if self.retired is None or overlap is None:
            return float("inf")
        return self.retired + overlap


def derive(secret: bytes, label: str, epoch: int, length: int) -> bytes:
    """Key material for one purpose and time epoch; every host derives the same."""
    info = b"ftpcluster/" + label.encode() + b"/" + str(epoch).encode()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


class Sealer:
    """AEAD seal/open under the current secret; opens under any secret it holds."""

    def __init__(self, secrets_: list[Secret], overlap: float | None = None) -> None:
        if not secrets_:
            raise SealError("no secret")
        self.current = secrets_[0]
        self.secrets = list(secrets_)
        self.overlap = overlap
        self._aead = {s.key_id: AESGCM(derive(s.material, "seal", 0, 32)) for s in secrets_}
        self._until = {s.key_id: s.accepted_until(overlap) for s in secrets_[1:]}

    @property
    def secret(self) -> bytes:
        return self.current.material

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = os.urandom(NONCE)
        head = HEADER.pack(MAGIC, self.current.key_id)
        return head + nonce + self._aead[self.current.key_id].encrypt(nonce, plaintext, head + aad)

    def open(self, sealed: bytes, aad: bytes = b"") -> bytes | None:
        """The plaintext, or None when the value is not ours or was tampered with."""
        if not isinstance(sealed, (bytes, bytearray)) or not (HEADER.size + NONCE + TAG <= len(sealed) <= MAX_SEALED):
            return None
        magic, key_id = HEADER.unpack_from(sealed)
        aead = self._aead.get(key_id)
        if magic != MAGIC or aead is None or (key_id in self._until and time.time() >= self._until[key_id]):
            return None
        head = bytes(sealed[: HEADER.size])
        nonce = bytes(sealed[HEADER.size : HEADER.size + NONCE])
        try:
            return aead.decrypt(nonce, bytes(sealed[HEADER.size + NONCE :]), head + aad)
        except Exception:  # InvalidTag and friends: a miss
            return None


def parse_key_file(text: str) -> list[Secret]:
    out: list[Secret] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        bad = f"line {n}: expected '<id> <64 hex chars> [retired=<unix seconds>]'"
        try:
            key_id, material = int(parts[0]), bytes.fromhex(parts[1])
            retired = float(parts[2].removeprefix("retired=")) if len(parts) == 3 and parts[2].startswith("retired=") else None
        except (IndexError, ValueError):
            raise SealError(bad) from None
        if len(parts) != (2 if retired is None else 3) or len(material) != 32 or not 0 <= key_id < 2**32:
            raise SealError(bad)
        out.append(Secret(key_id, material, retired))
    if not out:
        raise SealError("no key in file")
    return out


def load_secrets(path: str | Path) -> list[Secret]:
    """The key file's secrets, current first (the one loader for every purpose)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SealError(f"cannot read session key file {p}: {e.strerror}") from None
    try:
        return parse_key_file(text)
    except SealError as e:
        raise SealError(f"{p}: {e}") from None


def load_sealer(path: str | Path, overlap: float | None = None) -> Sealer:
    return Sealer(load_secrets(path), overlap)


def generate_key_file(path: str | Path, keep_old: int = 2) -> Secret:
    """Write a new current secret; keep up to `keep_old` previous ones so values
    sealed under them still open on hosts that have the new file (rotation)."""
    p = Path(path)
    old: list[Secret] = []
    if p.exists():
        try:
            old = parse_key_file(p.read_text())
        except (OSError, SealError):
            old = []
    used = {s.key_id for s in old}
    key_id = secrets.randbelow(2**31)
    while key_id in used:
        key_id = secrets.randbelow(2**31)
    new = Secret(key_id, secrets.token_bytes(32))
    now = int(time.time())
    old = [s if s.retired is not None else Secret(s.key_id, s.material, now) for s in old]
    lines = ["# ftpcluster cluster key: copy this file to every host; the first line seals and MACs,",
             "# retired ones are still accepted for [tls] session_key_overlap after their stamp"]  # fmt: skip
    lines += [f"{s.key_id} {s.material.hex()}" + (f" retired={int(s.retired)}" if s.retired is not None else "")
              for s in [new, *old[:keep_old]]]  # fmt: skip
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, p)
    return new


def fingerprint(sealer: Sealer) -> str:
    """A short non-secret id of the current secret, for status and logs."""
    return hashlib.sha256(b"fp" + sealer.secret).hexdigest()[:12]
