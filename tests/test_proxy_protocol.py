"""PROXY protocol parser (sans-IO) and the exact-read receiver on real socket pairs."""

from __future__ import annotations

import asyncio
import json
import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftpcluster.worker.loops import new_event_loop
from ftpcluster.worker.proxy_accept import ProxyReceiver, parse_trusted, read_proxy_header, receive_header

from .support_server import REPO
from ftpcluster.worker.proxy_protocol import (
    MAX_V2_LENGTH,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    NeedMore,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    build_v1,
    build_v2,
    crc32c,
    parse_header,
)
from ftpcluster.config import ProxyProtocolConfig

PAYLOAD = b"USER alice\r\n"


def stream_read(data: bytes) -> tuple[ProxyHeader | None, int]:
    """Drive the parser like the socket reader does (exact sizes, peek for v1 lines)."""
    p = ProxyParser()
    pos = 0
    for _ in range(500):
        step = p.next_step()
        if step.line:
            window = data[pos : pos + step.limit]
            nl = window.find(b"\n")
            take = nl + 1 if nl >= 0 else len(window)
        else:
            take = step.safe
        chunk = data[pos : pos + take]
        if not chunk:
            return None, pos
        pos += len(chunk)
        got = p.feed(chunk)
        if isinstance(got, ProxyHeader):
            return got, pos
    raise AssertionError("parser did not converge")


def v2_raw(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# ------------------------------------------------------------------ CRC32C
def test_crc32c_known_vectors() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43


# ------------------------------------------------------------------ v1
@pytest.mark.parametrize(
    "line, source, dest, family",
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 21\r\n", ("203.0.113.7", 56324), ("192.0.2.1", 21), "TCP4"),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ("0.0.0.0", 0), ("255.255.255.255", 65535), "TCP4"),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 1024 990\r\n", ("2001:db8::7", 1024), ("2001:db8::1", 990), "TCP6"),
        (b"PROXY TCP6 ::ffff:10.1.2.3 ::1 5 21\r\n", (str(ipaddress.IPv6Address("::ffff:10.1.2.3")), 5), ("::1", 21), "TCP6"),
    ],
)
def test_v1_valid(line: bytes, source: tuple[str, int], dest: tuple[str, int], family: str) -> None:
    h, used = stream_read(line + PAYLOAD)
    assert h is not None and used == len(line)
    assert (h.version, h.command, h.family, h.source, h.dest) == (1, "PROXY", family, source, dest)


def test_v1_unknown_uses_real_endpoints() -> None:
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"):
        h, used = stream_read(line + PAYLOAD)
        assert h is not None and used == len(line)
        assert h.command == "LOCAL" and h.source is None


def test_v1_longest_line_is_accepted_and_one_more_byte_is_not() -> None:
    a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {a} {a} 65535 65535\r\n".encode()
    assert len(line) == 104
    h, _ = stream_read(line)
    assert h is not None and h.source == (a, 65535)
    long_unknown = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
    assert len(long_unknown) == 107
    assert stream_read(long_unknown)[0] is not None
    with pytest.raises(ProxyError):
        stream_read(b"PROXY UNKNOWN " + b"x" * (108 - 16) + b"\r\n")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 021\r\n",  # leading zero in a port
        b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 21\r\n",  # port out of range
        b"PROXY TCP4 203.0.113.07 192.0.2.1 1 21\r\n",  # leading zero in an address
        b"PROXY TCP4 203.0.113.7  192.0.2.1 1 21\r\n",  # double space
        b"PROXY TCP4 203.0.113.7 192.0.2.1 1 21 \r\n",  # trailing space
        b"PROXY TCP4 203.0.113.7 192.0.2.1 1\r\n",  # a field missing
        b"PROXY TCP4 2001:db8::1 192.0.2.1 1 21\r\n",  # family mismatch
        b"PROXY TCP6 203.0.113.7 2001:db8::1 1 21\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 21\r\n",  # scope id
        b"PROXY TCP4 203.0.113.7 192.0.2.1 +1 21\r\n",
        b"PROXY UDP4 203.0.113.7 192.0.2.1 1 21\r\n",
        b"PROXY tcp4 203.0.113.7 192.0.2.1 1 21\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 1 21\n",  # LF without CR
        b"PROXY TCP4 203.0.113.7\r192.0.2.1 1 21\r\n",
        b"proxy TCP4 203.0.113.7 192.0.2.1 1 21\r\n",
        b"PROXYTCP4 203.0.113.7 192.0.2.1 1 21\r\n",
        b"PR0XY UNKNOWN\r\n",
        b"PROXY TCP4 \xff.0.113.7 192.0.2.1 1 21\r\n",
        b"PROXY " + b"A" * 120,  # no CRLF within 107 bytes
    ],
)
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyError):
        stream_read(line + PAYLOAD)


def test_v1_truncated_is_incomplete_not_an_error() -> None:
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 21\r\n"
    for cut in range(len(line)):
        h, _ = stream_read(line[:cut])
        assert h is None


# ------------------------------------------------------------------ v2
def test_v2_inet_and_inet6() -> None:
    h4 = build_v2(("203.0.113.7", 40000), ("192.0.2.1", 21))
    h, used = stream_read(h4 + PAYLOAD)
    assert h is not None and used == len(h4) == 28
    assert (h.version, h.command, h.family, h.source, h.dest) == (2, "PROXY", "INET", ("203.0.113.7", 40000), ("192.0.2.1", 21))
    h6 = build_v2(("2001:db8::7", 1), ("2001:db8::1", 990))
    h, used = stream_read(h6 + b"\x16\x03\x01")  # a ClientHello follows
    assert h is not None and used == len(h6) == 52
    assert h.family == "INET6" and h.source == ("2001:db8::7", 1)


def test_v2_local_uses_real_endpoints_and_honours_length() -> None:
    h, used = stream_read(build_v2(None, None) + PAYLOAD)  # haproxy's health check
    assert h is not None and used == 16 and h.command == "LOCAL" and h.source is None
    # LOCAL with an address block and a TLV: all of it is skipped, the source is still ignored.
    body = struct.pack("!4s4sHH", b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 1, 2) + tlv(PP2_TYPE_NOOP, b"xx")
    raw = v2_raw(0x20, 0x11, body)
    h, used = stream_read(raw + PAYLOAD)
    assert h is not None and used == len(raw) and h.source is None and h.tlv(PP2_TYPE_NOOP) == b"xx"
    # LOCAL claiming INET with no address bytes: the family is ignored.
    h, used = stream_read(v2_raw(0x20, 0x11, b"") + PAYLOAD)
    assert h is not None and used == 16 and h.source is None


def test_v2_unspec_and_unix_use_real_endpoints() -> None:
    h, _ = stream_read(v2_raw(0x21, 0x00, b"") + PAYLOAD)
    assert h is not None and h.command == "PROXY" and h.source is None
    unix = v2_raw(0x21, 0x31, b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0"))
    h, used = stream_read(unix + PAYLOAD)
    assert h is not None and used == 16 + 216 and h.family == "UNIX" and h.source is None
    with pytest.raises(ProxyError):  # UNIX needs its 216 bytes
        stream_read(v2_raw(0x21, 0x31, b"x" * 100))


def test_v2_tlvs_and_good_crc() -> None:
    tlvs = [(PP2_TYPE_ALPN, b"ftp"), (PP2_TYPE_AUTHORITY, b"ftp.example.org"), (PP2_TYPE_UNIQUE_ID, b"req-42"), (0xE0, b"custom")]
    raw = build_v2(("2001:db8::7", 4242), ("2001:db8::1", 21), tlvs, crc=True)
    h, used = stream_read(raw + PAYLOAD)
    assert h is not None and used == len(raw)
    assert h.tlv(PP2_TYPE_CRC32C) is not None
    info = h.info()
    assert info["proxy_alpn"] == "ftp" and info["proxy_authority"] == "ftp.example.org" and info["proxy_unique_id"] == "req-42"


def test_v2_ssl_tlv_tolerated() -> None:
    sub = tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client.example") + tlv(0x23, b"TLS_AES_128_GCM_SHA256")
    ssl_value = bytes([0x07]) + struct.pack("!I", 0) + sub
    raw = build_v2(("203.0.113.7", 1), ("192.0.2.1", 990), [(PP2_TYPE_SSL, ssl_value)], crc=True)
    h, _ = stream_read(raw)
    assert h is not None and h.ssl["version"] == "TLSv1.3" and h.ssl["cn"] == "client.example"
    assert h.info()["proxy_ssl"]["cipher"] == "TLS_AES_128_GCM_SHA256"


@pytest.mark.parametrize("flip", [0, 5, 20, -1])
def test_v2_bad_crc_rejected(flip: int) -> None:
    raw = bytearray(build_v2(("203.0.113.7", 40000), ("192.0.2.1", 21), [(PP2_TYPE_ALPN, b"ftp")], crc=True))
    pos = 16 + flip if flip >= 0 else len(raw) + flip
    raw[pos] ^= 0x01
    with pytest.raises(ProxyError):
        stream_read(bytes(raw))


@pytest.mark.parametrize(
    "raw",
    [
        v2_raw(0x11, 0x11, bytes(12)),  # version 1 in a v2 header
        v2_raw(0x31, 0x11, bytes(12)),  # version 3
        v2_raw(0x22, 0x11, bytes(12)),  # command 2
        v2_raw(0x2F, 0x11, bytes(12)),
        v2_raw(0x21, 0x41, bytes(12)),  # family 4
        v2_raw(0x21, 0x13, bytes(12)),  # transport 3
        v2_raw(0x21, 0x12, bytes(12)),  # DGRAM on a stream listener
        v2_raw(0x21, 0x11, bytes(11)),  # too short for INET
        v2_raw(0x21, 0x21, bytes(35)),  # too short for INET6
        v2_raw(0x21, 0x11, bytes(12) + b"\x04\x00"),  # truncated TLV
        v2_raw(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_NOOP, b"abc")[:-1] + b""),  # TLV overruns
        v2_raw(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_CRC32C, b"\0\0\0")),  # CRC of the wrong size
        v2_raw(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_UNIQUE_ID, b"u" * 129)),
        v2_raw(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_SSL, b"\x01\0\0")),  # SSL shorter than 5 bytes
        v2_raw(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_SSL, b"\x01\0\0\0\0" + b"\x21\x00\x09ab")),  # sub-TLV overruns
    ],
)
def test_v2_malformed(raw: bytes) -> None:
    with pytest.raises(ProxyError):
        stream_read(raw + PAYLOAD)


def test_v2_repeated_crc_rejected() -> None:
    raw = bytearray(build_v2(("203.0.113.7", 1), ("192.0.2.1", 21), [(PP2_TYPE_CRC32C, b"\0\0\0\0")], crc=True))
    with pytest.raises(ProxyError):
        stream_read(bytes(raw))


def test_v2_wrong_signature_rejected_early() -> None:
    for bad in (b"\r\n\r\n\x00\r\nQUIT!", b"\r\n\r\n\x01", b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(8)):
        with pytest.raises(ProxyError):
            p = ProxyParser()
            p.feed(bad[:15])


def test_v2_oversize_rejected_from_the_fixed_part() -> None:
    """The length cap is applied before a single byte of the body is read."""
    fixed = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_LENGTH + 1)
    p = ProxyParser()
    assert isinstance(p.feed(fixed[:15]), NeedMore)
    with pytest.raises(ProxyError):
        p.feed(fixed[15:])
    exact = v2_raw(0x21, 0x11, bytes(12) + tlv(PP2_TYPE_NOOP, bytes(MAX_V2_LENGTH - 15)))
    assert stream_read(exact)[0] is not None


def test_v2_truncated_is_incomplete() -> None:
    raw = build_v2(("2001:db8::7", 1), ("2001:db8::1", 21), [(PP2_TYPE_ALPN, b"ftp")], crc=True)
    for cut in range(len(raw)):
        assert stream_read(raw[:cut])[0] is None


def test_feeding_past_the_header_is_refused() -> None:
    p = ProxyParser()
    raw = build_v2(("203.0.113.7", 1), ("192.0.2.1", 21))
    p.feed(raw[:15])
    with pytest.raises(ProxyError):
        p.feed(raw[15:] + b"X")


def test_parse_header_whole_buffer() -> None:
    raw = build_v1(("203.0.113.7", 1), ("192.0.2.1", 21))
    h, used = parse_header(raw + PAYLOAD)
    assert h is not None and used == len(raw)
    assert parse_header(raw[:-1]) == (None, 0)


# ------------------------------------------------------------------ property tests
_valid_headers = st.one_of(
    st.builds(
        lambda a, b, p, q, v2, crc: build_v2((a, p), (b, q), crc=crc) if v2 else build_v1((a, p), (b, q)),
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=4).map(str),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.booleans(),
        st.booleans(),
    ),
    st.builds(
        lambda a, b, p, q, v2, tl: build_v2((a, p), (b, q), tl, crc=True) if v2 else build_v1((a, p), (b, q)),
        st.ip_addresses(v=6).map(str),
        st.ip_addresses(v=6).map(str),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.booleans(),
        st.lists(st.tuples(st.sampled_from([PP2_TYPE_ALPN, PP2_TYPE_NOOP, 0xE1]), st.binary(max_size=40)), max_size=4),
    ),
    st.just(build_v2(None, None)),
    st.just(build_v1(None, None)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_proxy_error(data: bytes) -> None:
    try:
        h, used = stream_read(data)
    except ProxyError:
        return
    assert used <= len(data)
    if h is not None:
        assert used == h.length


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([b"PROXY ", V2_SIGNATURE + b"\x21"]), st.binary(max_size=200))
def test_random_bodies_after_a_real_prefix(prefix: bytes, rest: bytes) -> None:
    data = prefix + rest
    try:
        h, used = stream_read(data)
    except ProxyError:
        return
    assert used <= len(data) and (h is None or used == h.length)


@settings(max_examples=200, deadline=None)
@given(_valid_headers, st.binary(max_size=64))
def test_valid_header_then_anything_consumes_exactly_the_header(header: bytes, tail: bytes) -> None:
    h, used = stream_read(header + tail)
    assert h is not None and used == len(header) == h.length


@settings(max_examples=200, deadline=None)
@given(_valid_headers, st.data())
def test_mutated_headers_never_crash(header: bytes, data: st.DataObject) -> None:
    raw = bytearray(header)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        h, used = stream_read(bytes(raw) + PAYLOAD)
    except ProxyError:
        return
    assert h is None or used == h.length <= len(raw) + len(PAYLOAD)


# ------------------------------------------------------------------ the socket reader
@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    lp = new_event_loop(request.param == "uvloop")
    yield lp
    lp.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


@pytest.mark.parametrize("kind", ["v1", "v2", "v2crc"])
def test_socket_reader_leaves_the_payload(loop: asyncio.AbstractEventLoop, kind: str) -> None:
    header = {
        "v1": build_v1(("203.0.113.7", 1), ("192.0.2.1", 21)),
        "v2": build_v2(("203.0.113.7", 1), ("192.0.2.1", 21)),
        "v2crc": build_v2(("2001:db8::7", 1), ("2001:db8::1", 21), [(PP2_TYPE_ALPN, b"ftp")], crc=True),
    }[kind]
    a, b = _pair()
    with a, b:
        b.sendall(header + b"\x16\x03\x01 ClientHello")  # one segment: header and what follows
        h = loop.run_until_complete(receive_header(loop, a, 5))
        assert h.length == len(header)
        assert a.recv(100) == b"\x16\x03\x01 ClientHello"


def test_socket_reader_slow_bytes(loop: asyncio.AbstractEventLoop) -> None:
    header = build_v1(("2001:db8::7", 1), ("2001:db8::1", 21))
    a, b = _pair()

    async def trickle() -> None:
        for i in range(len(header)):
            b.send(header[i : i + 1] + (PAYLOAD if i == len(header) - 1 else b""))
            await asyncio.sleep(0.002)

    async def main() -> ProxyHeader:
        t = asyncio.ensure_future(trickle())
        h = await receive_header(loop, a, 5)
        await t
        return h

    with a, b:
        h = loop.run_until_complete(main())
        assert h.source == ("2001:db8::7", 1)
        assert a.recv(100) == PAYLOAD


def test_socket_reader_timeout_eof_and_garbage(loop: asyncio.AbstractEventLoop) -> None:
    a, b = _pair()
    with a, b:
        b.send(b"PROXY TCP4 1.2")
        with pytest.raises(TimeoutError):
            loop.run_until_complete(receive_header(loop, a, 0.2))
    a, b = _pair()
    with a, b:
        b.send(b"PROXY TCP4 1.2")
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError):
            loop.run_until_complete(receive_header(loop, a, 5))
    a, b = _pair()
    with a, b:
        b.send(b"USER alice\r\nPASS x\r\n")
        assert loop.run_until_complete(read_proxy_header(loop, a, 5)) is None


def test_receiver_policy(loop: asyncio.AbstractEventLoop) -> None:
    cfg = ProxyProtocolConfig(enabled=True, trusted=["127.0.0.0/8", "2001:db8:1::/48"], timeout=0.5)
    r = ProxyReceiver(cfg, loop)
    assert r.trusted("127.0.0.9") and r.trusted("::ffff:127.0.0.1") and r.trusted("2001:db8:1::5")
    assert not r.trusted("10.0.0.1") and not r.trusted("2001:db8:2::5") and not r.trusted("junk")
    assert parse_trusted(["10.1.2.3/8", " "]) == parse_trusted(["10.0.0.0/8"])
    a, b = _pair()
    with a, b:
        # Untrusted: nothing is read, the header stays for the FTP layer to refuse.
        b.send(build_v1(("203.0.113.7", 1), ("192.0.2.1", 21)))
        got = loop.run_until_complete(r.control_hook(a, ("10.0.0.1", 5555)))
        assert got == (("10.0.0.1", 5555), {})
        assert a.recv(6) == b"PROXY "
    a, b = _pair()
    with a, b:
        b.send(build_v2(("203.0.113.7", 1234), ("192.0.2.1", 21)) + PAYLOAD)
        client, info = loop.run_until_complete(r.control_hook(a, ("::ffff:127.0.0.1", 5555)))  # type: ignore[misc]
        assert client == ("203.0.113.7", 1234)
        assert info["proxy_peer"] == "127.0.0.1" and info["proxy_version"] == 2
    a, b = _pair()
    with a, b:
        b.send(build_v2(None, None))
        client, info = loop.run_until_complete(r.control_hook(a, ("127.0.0.1", 5555)))  # type: ignore[misc]
        assert client == ("127.0.0.1", 5555) and info["proxy_command"] == "LOCAL"
    a, b = _pair()
    with a, b:  # trusted and silent: dropped at the timeout
        assert loop.run_until_complete(r.control_hook(a, ("127.0.0.1", 5555))) is None
    assert (r.headers_ok, r.headers_rejected, r.headers_local, r.untrusted) == (2, 1, 1, 1)
    assert r.rejected_by["timeout"] == 1


def test_module_level_loggers_follow_the_configuration(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """proxy_accept's logger is made at import, before the node configures logging:
    its lines must still go where the configuration says (they went to stdout in
    console format, so PROXY rejections never reached the log file)."""
    import subprocess
    import sys

    code = (
        "from pathlib import Path\n"
        "from ftpcluster.worker import proxy_accept\n"
        "from ftpcluster import config, logs\n"
        f"cfg = config.from_dict({{'log': {{'file': 'x.log', 'format': 'json'}}}}, Path({str(tmp_path / 'c.toml')!r}))\n"
        "logs.configure(cfg.log, cfg.base_dir, role='node')\n"
        "proxy_accept.log.info('PROXY header rejected', reason='test')\n"
        "logs.flush()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert "PROXY header rejected" not in r.stdout
    line = json.loads((tmp_path / "x.log").read_text().splitlines()[-1])
    assert (line["event"], line["channel"], line["reason"]) == ("PROXY header rejected", "proxy", "test")
