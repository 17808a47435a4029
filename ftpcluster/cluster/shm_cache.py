"""A small key -> bytes cache in a shared-memory file, shared by every process of a host.

Used as the L1 of the TLS session store: the OpenSSL callbacks run inside a
handshake and must answer in microseconds, without a lock a dead process
could leave held.

Layout: a header, then `sets` x `ways` slots of `slot_size` bytes (set
associative: a key hashes to one set and may live in any of its ways; a
full set evicts the entry closest to expiry). Each slot starts with a
sequence number: a writer takes an fcntl lock on that slot's byte range (the
kernel drops it if the writer dies), makes the number odd, writes, makes it
even again. A reader copies the slot and accepts it only if the number was
even and unchanged, so it never sees half an entry; a writer killed mid-write
leaves an odd number, which reads as a miss until the slot is written again.
The entry also carries a CRC32 (expiry, key, value): Python has no memory
barriers, and a weakly ordered CPU (aarch64) may show a value's bytes after the
closing sequence store; such a slot fails its CRC and reads as a miss."""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import threading
import time
import zlib
from pathlib import Path

from .shm_file import map_shared

MAGIC = b"FTPCSHM2"
HEADER = struct.Struct("<8sIII")  # magic, sets, ways, slot size
# seq, CRC32 of the rest of the entry, expires_at (wall clock), key length, key digest, value length
SLOT_HEAD = struct.Struct("<QIdH32sH")
CHECKED = 12  # the CRC covers the entry from here (after seq and the CRC) to the value's end
READ_TRIES = 4
# fcntl locks are per process: a node's loop and its memcached thread (which copies
# sessions from memcached) both write, so writers of one process also take this
# lock. Held across fork() by the forking thread only.
_THREAD_LOCK = threading.Lock()
os.register_at_fork(before=_THREAD_LOCK.acquire, after_in_parent=_THREAD_LOCK.release,
                    after_in_child=_THREAD_LOCK.release)  # fmt: skip


class ShmCache:
    def __init__(self, path: Path, sets: int = 4096, ways: int = 4, slot_size: int = 2048, create: bool = False) -> None:
        self.path = Path(path)
        self.sets, self.ways, self.slot_size = sets, ways, slot_size
        self.max_value = slot_size - SLOT_HEAD.size
        size = HEADER.size + sets * ways * slot_size
        self.mm, self.fd = map_shared(self.path, size, create, wipe=True, mismatch="size differs from the configured layout")
        if create:
            HEADER.pack_into(self.mm, 0, MAGIC, sets, ways, slot_size)
        magic, s, w, ss = HEADER.unpack_from(self.mm, 0)
        if (magic, s, w, ss) != (MAGIC, sets, ways, slot_size):
            raise ValueError(f"{self.path}: not a cache with this layout")

    # ------------------------------------------------------------ helpers
    @staticmethod
    def digest(key: bytes) -> bytes:
        return hashlib.blake2b(key, digest_size=32).digest()

    def _slots(self, digest: bytes) -> range:
        s = int.from_bytes(digest[:8], "little") % self.sets
        first = HEADER.size + s * self.ways * self.slot_size
        return range(first, first + self.ways * self.slot_size, self.slot_size)

    def _read_slot(self, off: int, want: bytes | None = None) -> tuple[int, float, bytes, bytes] | None:
        """(seq, expires_at, key digest, value) of a stable slot whose CRC holds, else
        None; with `want`, None at once for a slot holding another key (no copy)."""
        mm = self.mm
        for _ in range(READ_TRIES):
            seq, crc, expires, _klen, kd, vlen = SLOT_HEAD.unpack_from(mm, off)
            if seq & 1:
                continue
            if vlen > self.max_value or (want is not None and kd != want):
                return None
            entry = mm[off + CHECKED : off + SLOT_HEAD.size + vlen]
            if struct.unpack_from("<Q", mm, off)[0] == seq and (seq == 0 or zlib.crc32(entry) == crc):
                return seq, expires, kd, entry[SLOT_HEAD.size - CHECKED :]
        return None

    # ------------------------------------------------------------ API
    def get(self, key: bytes, now: float | None = None) -> bytes | None:
        d = self.digest(key)
        now = time.time() if now is None else now
        for off in self._slots(d):
            got = self._read_slot(off, d)
            if got is not None and got[1] > now and got[0]:
                return got[3]
        return None

    def put(self, key: bytes, value: bytes, ttl: float) -> bool:
        """Store; False when the value is too large for a slot."""
        if len(value) > self.max_value or ttl <= 0:
            return False
        d = self.digest(key)
        now = time.time()
        victim, victim_exp = None, float("inf")
        for off in self._slots(d):
            got = self._read_slot(off)
            if got is None or got[0] == 0 or got[1] <= now or got[2] == d:
                victim = off
                break
            if got[1] < victim_exp:
                victim, victim_exp = off, got[1]
        assert victim is not None
        self._write(victim, d, value, now + ttl)
        return True

    def delete(self, key: bytes) -> bool:
        d = self.digest(key)
        for off in self._slots(d):
            if self._read_slot(off, d) is not None:
                self._write(off, b"\0" * 32, b"", 0.0)
                return True
        return False

    def _write(self, off: int, digest: bytes, value: bytes, expires: float) -> None:
        with _THREAD_LOCK:
            self._write_locked(off, digest, value, expires)

    def _write_locked(self, off: int, digest: bytes, value: bytes, expires: float) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, self.slot_size, off, os.SEEK_SET)
        try:
            mm = self.mm
            seq = struct.unpack_from("<Q", mm, off)[0]
            seq = seq + 1 if seq & 1 == 0 else seq  # odd: being written (a dead writer left it odd: stay odd)
            struct.pack_into("<Q", mm, off, seq)
            entry = SLOT_HEAD.pack(seq, 0, expires, 32, digest, len(value))[CHECKED:] + value
            mm[off + 8 : off + CHECKED + len(entry)] = struct.pack("<I", zlib.crc32(entry)) + entry
            struct.pack_into("<Q", mm, off, seq + 1)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, self.slot_size, off, os.SEEK_SET)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)
