"""PROXY protocol v1/v2 header parser, sans-IO (haproxy doc/proxy-protocol.txt).

Feed it bytes; it answers `NeedMore` (with how many bytes may be read without
crossing the end of the header), a `ProxyHeader`, or raises `ProxyError`.
The IO side must never read past the header: the bytes after it are the
client's FTP command or TLS ClientHello. Validation is strict because a header
decides which address bans and limits apply to: anything malformed aborts."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # bytes including CRLF
V1_MIN = 15  # "PROXY UNKNOWN\r\n"
V2_FIXED = 16
MAX_V2_LENGTH = 2048  # our cap on the v2 length field (addresses + TLVs); the spec allows 65535

# v2 TLV types
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
MAX_UNIQUE_ID = 128

_FAMILY_V2 = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_ADDR_LEN = {"UNSPEC": 0, "INET": 12, "INET6": 36, "UNIX": 216}
_TRANSPORT_V2 = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header: drop the connection."""


@dataclass(frozen=True)
class NeedMore:
    """Read more. `safe`: bytes that may always be read now. `line`: v1, the header
    ends at the first LF, at most `limit` bytes away (peek to find it)."""

    safe: int
    line: bool = False
    limit: int = 0


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    command: str  # "PROXY" or "LOCAL" (v1 UNKNOWN counts as LOCAL: use the real endpoints)
    family: str  # v1: TCP4 TCP6 UNKNOWN; v2: INET INET6 UNIX UNSPEC
    source: tuple[str, int] | None  # None: use the connection's real endpoints
    dest: tuple[str, int] | None
    length: int  # bytes the header took on the wire
    tlvs: tuple[tuple[int, bytes], ...] = ()
    ssl: dict[str, Any] = field(default_factory=dict)

    def tlv(self, kind: int) -> bytes | None:
        for t, v in self.tlvs:
            if t == kind:
                return v
        return None

    def info(self) -> dict[str, Any]:
        """Log-friendly details (ALPN, authority, unique id, SSL) for the session's info."""
        out: dict[str, Any] = {"proxy_version": self.version, "proxy_command": self.command}
        if self.dest is not None:
            out["proxy_dest"] = f"{self.dest[0]}:{self.dest[1]}"
        for kind, key in ((PP2_TYPE_ALPN, "proxy_alpn"), (PP2_TYPE_AUTHORITY, "proxy_authority")):
            v = self.tlv(kind)
            if v is not None:
                out[key] = v.decode("utf-8", "replace")
        uid = self.tlv(PP2_TYPE_UNIQUE_ID)
        if uid is not None:
            out["proxy_unique_id"] = uid.hex() if not uid.isascii() else uid.decode("ascii")
        if self.ssl:
            out["proxy_ssl"] = dict(self.ssl)
        return out


# ------------------------------------------------------------------ CRC32C (Castagnoli)
def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # reflected 0x1EDC6F41
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of `data`. Pure Python: a header is at most a few hundred bytes, so a
    table loop (about a microsecond per 10 bytes) does not earn a compiled dependency."""
    t = _CRC_TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# ------------------------------------------------------------------ v1
def _v1_port(text: bytes) -> int:
    if not text or not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0:1] == b"0"):
        raise ProxyError(f"bad v1 port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"v1 port out of range: {port}")
    return port


def _v1_addr(text: bytes, v6: bool) -> str:
    try:
        s = text.decode("ascii")
        if v6:
            if "%" in s:  # no scope ids on the wire
                raise ValueError(s)
            return str(ipaddress.IPv6Address(s))
        return str(ipaddress.IPv4Address(s))  # rejects leading zeros since Python 3.9.5
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(f"bad v1 {'TCP6' if v6 else 'TCP4'} address {text[:40]!r}") from None


def parse_v1(line: bytes) -> ProxyHeader:
    """One complete v1 line, CRLF included."""
    if len(line) > V1_MAX:
        raise ProxyError("v1 header longer than 107 bytes")
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyError("v1 header must be 'PROXY ...' ending in CRLF")
    body = line[len(V1_PREFIX) : -2]
    if b"\r" in body or b"\n" in body or b"\x00" in body:
        raise ProxyError("control characters in a v1 header")
    parts = body.split(b" ")
    proto = parts[0]
    if proto == b"UNKNOWN":
        # The spec: ignore whatever follows UNKNOWN; use the real endpoints.
        return ProxyHeader(1, "LOCAL", "UNKNOWN", None, None, len(line))
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyError(f"unknown v1 protocol {proto[:10]!r}")
    if len(parts) != 5:
        raise ProxyError("v1 header needs exactly: protocol src dst sport dport, single spaces")
    v6 = proto == b"TCP6"
    src, dst = _v1_addr(parts[1], v6), _v1_addr(parts[2], v6)
    sport, dport = _v1_port(parts[3]), _v1_port(parts[4])
    return ProxyHeader(1, "PROXY", proto.decode(), (src, sport), (dst, dport), len(line))


# ------------------------------------------------------------------ v2
def _parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyError("truncated TLV")
        kind, n = data[i], int.from_bytes(data[i + 1 : i + 3], "big")
        i += 3
        if i + n > len(data):
            raise ProxyError(f"TLV 0x{kind:02x} overruns the header")
        out.append((kind, data[i : i + n]))
        i += n
    return out


def _parse_ssl(value: bytes) -> dict[str, Any]:
    if len(value) < 5:
        raise ProxyError("PP2_TYPE_SSL shorter than 5 bytes")
    client, verify = value[0], int.from_bytes(value[1:5], "big")
    out: dict[str, Any] = {"client": client, "verify": verify}
    names = {
        PP2_SUBTYPE_SSL_VERSION: "version",
        PP2_SUBTYPE_SSL_CN: "cn",
        PP2_SUBTYPE_SSL_CIPHER: "cipher",
        PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
        PP2_SUBTYPE_SSL_KEY_ALG: "key_alg",
    }
    for kind, v in _parse_tlvs(value[5:]):
        if kind in names:
            out[names[kind]] = v.decode("utf-8", "replace")
    return out


def parse_v2(header: bytes, max_length: int = MAX_V2_LENGTH) -> ProxyHeader:
    """One complete v2 header: the 16-byte fixed part and exactly `length` more bytes."""
    if len(header) < V2_FIXED or header[:12] != V2_SIGNATURE:
        raise ProxyError("bad v2 signature")
    ver_cmd, fam_proto, length = header[12], header[13], int.from_bytes(header[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"unsupported PROXY version {ver_cmd >> 4}")
    command = {0: "LOCAL", 1: "PROXY"}.get(ver_cmd & 0xF)
    if command is None:
        raise ProxyError(f"unknown v2 command {ver_cmd & 0xF}")
    family = _FAMILY_V2.get(fam_proto >> 4)
    transport = _TRANSPORT_V2.get(fam_proto & 0xF)
    if family is None or transport is None:
        raise ProxyError(f"invalid v2 family/transport byte 0x{fam_proto:02x}")
    if length > max_length:
        raise ProxyError(f"v2 length {length} over the cap {max_length}")
    if len(header) != V2_FIXED + length:
        raise ProxyError("v2 header size does not match its length field")
    addr_len = _ADDR_LEN[family]
    if length < addr_len:
        if command != "LOCAL":
            raise ProxyError(f"v2 length {length} too short for {family} addresses")
        addr_len = length  # LOCAL: the family is to be ignored; skip what is there
    body = header[V2_FIXED:]
    tlv_list = _parse_tlvs(body[addr_len:])
    ssl: dict[str, Any] = {}
    crc_seen = False
    tlv_start = V2_FIXED + addr_len
    pos = tlv_start
    for kind, value in tlv_list:
        if kind == PP2_TYPE_CRC32C:
            if len(value) != 4 or crc_seen:
                raise ProxyError("bad or repeated PP2_TYPE_CRC32C")
            crc_seen = True
            zeroed = bytearray(header)
            zeroed[pos + 3 : pos + 7] = b"\0\0\0\0"
            if crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyError("PP2_TYPE_CRC32C mismatch")
        elif kind == PP2_TYPE_UNIQUE_ID and len(value) > MAX_UNIQUE_ID:
            raise ProxyError("PP2_TYPE_UNIQUE_ID longer than 128 bytes")
        elif kind == PP2_TYPE_SSL:
            ssl = _parse_ssl(value)
        pos += 3 + len(value)
    source = dest = None
    if command == "PROXY" and transport == "DGRAM":
        raise ProxyError("a DGRAM PROXY header on a stream connection")
    if command == "PROXY" and transport == "STREAM" and family in ("INET", "INET6"):
        if family == "INET":
            s, d, sp, dp = struct.unpack("!4s4sHH", body[:12])
            source = (str(ipaddress.IPv4Address(s)), sp)
            dest = (str(ipaddress.IPv4Address(d)), dp)
        else:
            s, d, sp, dp = struct.unpack("!16s16sHH", body[:36])
            source = (str(ipaddress.IPv6Address(s)), sp)
            dest = (str(ipaddress.IPv6Address(d)), dp)
    # LOCAL, UNSPEC and UNIX (meaningless for a TCP server): the real endpoints apply.
    return ProxyHeader(2, command, family, source, dest, len(header), tuple(tlv_list), ssl)


# ------------------------------------------------------------------ the incremental parser
class ProxyParser:
    """Incremental: `feed` returns NeedMore until the header is complete. It never asks
    for a byte beyond the header, so the caller can read exactly what it says."""

    def __init__(self, max_length: int = MAX_V2_LENGTH) -> None:
        self.max_length = max_length
        self.buf = bytearray()
        self.result: ProxyHeader | None = None

    def next_step(self) -> NeedMore:
        b = self.buf
        n = len(b)
        if n < V1_MIN:
            return NeedMore(V1_MIN - n)  # both kinds are at least 15 bytes long
        if b[0:1] == b"P":
            return NeedMore(2 - (b[-1:] == b"\r"), line=True, limit=V1_MAX - n)
        if n < V2_FIXED:
            return NeedMore(V2_FIXED - n)
        return NeedMore(V2_FIXED + int.from_bytes(b[14:16], "big") - n)

    def feed(self, data: bytes) -> NeedMore | ProxyHeader:
        """Add bytes (never more than the last NeedMore allowed, or the excess is an error)."""
        if self.result is not None:
            raise ProxyError("header already complete")
        self.buf += data
        b = self.buf
        n = len(b)
        head = bytes(b[:12])
        if head[0:1] == b"P":
            if not V1_PREFIX.startswith(bytes(b[:6])):
                raise ProxyError("not a PROXY header")
            nl = b.find(b"\n")
            if nl < 0:
                if n >= V1_MAX:
                    raise ProxyError("no CRLF within 107 bytes")
                return self.next_step()
            if nl != n - 1:
                raise ProxyError("bytes after the v1 header were fed")
            self.result = parse_v1(bytes(b))
            return self.result
        if not V2_SIGNATURE.startswith(head[: min(n, 12)]):
            raise ProxyError("not a PROXY header")
        if n < V2_FIXED:
            return NeedMore(V2_FIXED - n)
        ver_cmd, length = b[12], int.from_bytes(b[14:16], "big")
        if ver_cmd >> 4 != 2:
            raise ProxyError(f"unsupported PROXY version {ver_cmd >> 4}")
        if length > self.max_length:
            raise ProxyError(f"v2 length {length} over the cap {self.max_length}")
        if n < V2_FIXED + length:
            return NeedMore(V2_FIXED + length - n)
        if n > V2_FIXED + length:
            raise ProxyError("bytes after the v2 header were fed")
        self.result = parse_v2(bytes(b), self.max_length)
        return self.result


def parse_header(data: bytes, max_length: int = MAX_V2_LENGTH) -> tuple[ProxyHeader | None, int]:
    """Whole-buffer convenience: (header, bytes used), or (None, 0) when incomplete.
    Raises ProxyError. Handy for tests and for senders' round trips."""
    p = ProxyParser(max_length)
    pos = 0
    while True:
        step = p.next_step()
        if step.line:
            nl = data.find(b"\n", pos, pos + step.limit)
            take = (nl + 1 - pos) if nl >= 0 else min(step.limit, len(data) - pos)
        else:
            take = step.safe
        chunk = data[pos : pos + take]
        if not chunk:
            return None, 0
        pos += len(chunk)
        got = p.feed(chunk)
        if isinstance(got, ProxyHeader):
            return got, pos
        if len(chunk) < take:
            return None, 0


# ------------------------------------------------------------------ senders (tests, health probes)
def build_v1(src: tuple[str, int] | None, dst: tuple[str, int] | None) -> bytes:
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP6" if ":" in src[0] else "TCP4"
    return f"PROXY {proto} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


def build_v2(
    src: tuple[str, int] | None,
    dst: tuple[str, int] | None,
    tlvs: list[tuple[int, bytes]] | tuple[tuple[int, bytes], ...] = (),
    crc: bool = False,
) -> bytes:
    """A v2 header; src None = LOCAL. `crc` appends a PP2_TYPE_CRC32C TLV with the right value."""
    if src is None or dst is None:
        ver_cmd, fam, addr = 0x20, 0x00, b""
    elif ":" in src[0]:
        ver_cmd, fam = 0x21, 0x21
        addr = ipaddress.IPv6Address(src[0]).packed + ipaddress.IPv6Address(dst[0]).packed + struct.pack("!HH", src[1], dst[1])
    else:
        ver_cmd, fam = 0x21, 0x11
        addr = ipaddress.IPv4Address(src[0]).packed + ipaddress.IPv4Address(dst[0]).packed + struct.pack("!HH", src[1], dst[1])
    body = addr + b"".join(bytes([k]) + len(v).to_bytes(2, "big") + v for k, v in tlvs)
    if crc:
        body += bytes([PP2_TYPE_CRC32C]) + b"\x00\x04" + b"\0\0\0\0"
    out = bytearray(V2_SIGNATURE + bytes([ver_cmd, fam]) + len(body).to_bytes(2, "big") + body)
    if crc:
        out[-4:] = crc32c(out).to_bytes(4, "big")
    return bytes(out)
