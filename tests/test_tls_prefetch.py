"""The ClientHello parser behind the pre-handshake session prefetch: real
ClientHellos from Python's ssl (in memory, against a real server context with
the host cache hooks) give the id the server will look up, and arbitrary bytes
never raise (the parser runs on the event loop on untrusted input)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftpcluster.worker.tls_prefetch import Incomplete, resumption_ids

from .support_server import cli


class Lookups:
    """A session backend that remembers what OpenSSL asked for."""

    def __init__(self) -> None:
        self.store_: dict[bytes, bytes] = {}
        self.asked: list[bytes] = []

    def lookup(self, sid: bytes) -> bytes | None:
        self.asked.append(sid)
        return self.store_.get(sid)

    def store(self, sid: bytes, der: bytes, ttl: float) -> None:
        self.store_[sid] = der


def _pump(client: ssl.SSLObject, server: ssl.SSLObject, bios: tuple[ssl.MemoryBIO, ...]) -> bytes:
    """Handshake in memory; returns the client's first flight (the ClientHello)."""
    c_in, c_out, s_in, s_out = bios
    first = b""
    for _ in range(20):
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        out = c_out.read()
        if out and not first:
            first = out
        s_in.write(out)
        c_in.write(s_out.read())
        if _done(client) and _done(server):
            break
    return first


def _done(obj: ssl.SSLObject) -> bool:
    try:
        obj.do_handshake()
        return True
    except ssl.SSLWantReadError:
        return False


@pytest.fixture(scope="module")
def server_ctx(tmp_path_factory):
    from ftpcluster.worker.tls_native import NativeUnavailable, install_session_cache

    d = tmp_path_factory.mktemp("cert")
    assert cli("cert", "generate", "--out", str(d)).returncode == 0
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.3 stateful tickets, as with session_tickets = "off"
    backend = Lookups()
    try:
        install_session_cache(ctx, backend, 300, b"test", lambda e: None)
    except NativeUnavailable as e:
        pytest.skip(str(e))
    return ctx, backend


def _client_ctx(maxv: ssl.TLSVersion) -> ssl.SSLContext:
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode, cctx.maximum_version = False, ssl.CERT_NONE, maxv
    return cctx


def _connect(server_ctx, cctx: ssl.SSLContext, session=None):
    ctx_s, _ = server_ctx
    bios = tuple(ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(bios[0], bios[1], session=session)
    server = ctx_s.wrap_bio(bios[2], bios[3], server_side=True)
    hello = _pump(client, server, bios)
    client.write(b"x")  # TLS 1.3: the ticket arrives with the server's first records
    bios[2].write(bios[1].read())
    try:
        server.read(1)
    except ssl.SSLWantReadError:
        pass
    bios[0].write(bios[3].read())
    try:
        client.read(1)
    except ssl.SSLWantReadError:
        pass
    return client, hello


@pytest.mark.parametrize("maxv", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_the_id_openssl_looks_up_is_the_one_peeked(server_ctx, maxv):
    _, backend = server_ctx
    cctx = _client_ctx(maxv)
    first, hello = _connect(server_ctx, cctx)
    assert resumption_ids(hello) == []  # nothing to resume on a first connection
    session = first.session
    backend.store_.clear()  # a miss on this "host": the lookup is what a prefetch must serve
    backend.asked.clear()
    _, hello2 = _connect(server_ctx, cctx, session=session)
    ids = resumption_ids(hello2)
    assert backend.asked, "the server did not look the session up"
    assert backend.asked[0] in ids, (backend.asked, ids)
    with pytest.raises(Incomplete):
        resumption_ids(hello2[: len(hello2) - 1])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data):
    for blob in (data, b"\x16\x03\x01" + len(data).to_bytes(2, "big") + data,
                 b"\x16\x03\x01" + (len(data) + 4).to_bytes(2, "big") + b"\x01" + len(data).to_bytes(3, "big") + data):  # fmt: skip
        try:
            ids = resumption_ids(blob)
        except Incomplete:
            continue
        assert all(0 < len(i) <= 32 for i in ids)
