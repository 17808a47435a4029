"""Native session-cache hooks on a stdlib SSLContext: a session made in one process
resumes in another through the shared-memory cache, TLS 1.2 and 1.3, checked with
`openssl s_client -sess_out/-sess_in` and with Python's ssl.SSLSession."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from ftpcluster.cluster.shm_cache import SLOT_HEAD, ShmCache
from ftpcluster.worker.tls_native import NativeUnavailable, ctx_pointer, session_from_der

from .support_server import REPO, cli


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("certs")
    r = cli("cert", "generate", "--out", str(d))
    assert r.returncode == 0, r.stderr
    return str(d / "cert.pem"), str(d / "key.pem")


def _listening(p: subprocess.Popen[str]) -> int:
    """The port a support server process bound (its "ready PORT" line): it binds port 0
    itself and keeps the socket, so no other process (another xdist worker, another
    test run) can take the port between a choice and the bind."""
    assert p.stdout is not None
    word, _, port = p.stdout.readline().strip().partition(" ")
    assert word == "ready" and port.isdigit(), (word, port)
    return int(port)


class Pair:
    """Two server processes sharing one cache file."""

    def __init__(self, tmp: Path, certs: tuple[str, str], count: int = 1) -> None:
        self.cache = tmp / "sessions.shm"
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[str]] = []
        try:
            for mode in ("create", "open"):  # the first creates the cache file the second opens
                p = subprocess.Popen([sys.executable, "-m", "tests.support_tls_native", str(self.cache), mode, *certs, str(count)],
                                     cwd=str(REPO), stdout=subprocess.PIPE, text=True)  # fmt: skip
                self.procs.append(p)
                self.ports.append(_listening(p))
        except BaseException:
            self.close()
            raise

    def lines(self) -> list[str]:
        out = []
        for p in self.procs:
            p.wait(20)
            out.append(p.stdout.read())  # type: ignore[union-attr]
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def _s_client(port: int, version: str, sess_flag: str, sess_file: Path) -> str:
    """One s_client connection. With -sess_out its input stays open until the session
    is in the file (at most 10 s): a TLS 1.3 ticket comes after the handshake, and
    s_client quits at the end of its input, maybe before the ticket arrived."""
    wait = ""
    if sess_flag == "-sess_out":
        sess_file.unlink(missing_ok=True)
        wait = f"for i in $(seq 200); do [ -s {sess_file} ] && break; sleep 0.05; done; "
    r = subprocess.run(
        f"({wait}echo) | openssl s_client -{version} -connect 127.0.0.1:{port} {sess_flag} {sess_file}",
        shell=True, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    return r.stdout


@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_openssl_resumes_in_another_process(tmp_path, certs, version):
    pair = Pair(tmp_path, certs)
    try:
        sess = tmp_path / "s.pem"
        first = _s_client(pair.ports[0], version, "-sess_out", sess)
        assert "\nNew, TLSv1." in first
        second = _s_client(pair.ports[1], version, "-sess_in", sess)
        assert "\nReused, TLSv1." in second, second[-2000:]
        a, b = pair.lines()
        assert "reused False" in a and "reused True" in b
    finally:
        pair.close()


@pytest.mark.parametrize("maxv", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_python_client_resumes_in_another_process(tmp_path, certs, maxv):
    pair = Pair(tmp_path, certs)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.maximum_version = maxv
        with socket.create_connection(("127.0.0.1", pair.ports[0]), timeout=10) as raw:
            with ctx.wrap_socket(raw) as s:
                s.recv(10)  # TLS 1.3 tickets arrive after the handshake
                session = s.session
        with socket.create_connection(("127.0.0.1", pair.ports[1]), timeout=10) as raw:
            with ctx.wrap_socket(raw, session=session) as s:
                s.recv(10)
                assert s.session_reused
        pair.lines()
    finally:
        pair.close()


class _NotAContext:
    """Shaped like an SSLContext to ctx_pointer: its first slot (where SSLContext keeps
    its SSL_CTX *) points at a zeroed buffer, so "options" read through the pointer are
    0, and it has an `options` attribute. Safe to read through; not an SSL_CTX."""

    __slots__ = ("buf", "opts")  # CPython lays slots out sorted: buf first

    def __init__(self, options: int) -> None:
        self.buf = bytes(1 << 16)
        self.opts = options

    @property
    def options(self) -> int:
        return self.opts

    @options.setter
    def options(self, value: int) -> None:
        self.opts = int(value)  # as a real context's setter does


def test_pointer_check_refuses_a_wrong_object():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert ctx_pointer(ctx)
    assert ctx.options == ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).options  # the flip was undone
    # Options that differ from what the pointer shows: refused by the first check.
    with pytest.raises(NativeUnavailable, match="options differ"):
        ctx_pointer(_NotAContext(int(ctx.options)))  # type: ignore[arg-type]
    # Options that happen to match (0 == the zeroed buffer) but a change from Python
    # does not show through the pointer: refused by the second check.
    with pytest.raises(NativeUnavailable, match="did not show"):
        ctx_pointer(_NotAContext(0))  # type: ignore[arg-type]
    # Garbage bytes never become a session.
    assert session_from_der(os.urandom(200)) is None
    assert session_from_der(b"") is None


def test_shm_cache_get_put_expire_and_torn_writes(tmp_path):
    c = ShmCache(tmp_path / "c.shm", sets=4, ways=2, slot_size=256, create=True)
    other = ShmCache(tmp_path / "c.shm", sets=4, ways=2, slot_size=256)
    assert c.put(b"k1", b"v1", 60) and other.get(b"k1") == b"v1"
    assert not c.put(b"big", b"x" * 1000, 60)  # larger than a slot: refused
    assert c.put(b"short", b"v", 0.001) and other.get(b"short", now=10**10) is None
    for i in range(100):  # eviction keeps the set bounded
        c.put(b"k%d" % i, b"v%d" % i, 60)
    assert other.get(b"k99") == b"v99"
    assert c.delete(b"k99") and other.get(b"k99") is None
    # A writer that died mid-write leaves an odd sequence number: a miss, never garbage.
    c.put(b"torn", b"abc", 60)
    for off in c._slots(c.digest(b"torn")):
        got = c._read_slot(off)
        if got and got[2] == c.digest(b"torn"):
            import struct

            struct.pack_into("<Q", c.mm, off, got[0] + 1)
    assert other.get(b"torn") is None
    c.put(b"torn", b"again", 60)
    assert other.get(b"torn") == b"again"
    # Value bytes that land after the closing sequence store (a weakly ordered CPU):
    # the sequence number is even and unchanged, the CRC is not.
    for off in c._slots(c.digest(b"torn")):
        got = c._read_slot(off)
        if got and got[2] == c.digest(b"torn"):
            value_at = off + SLOT_HEAD.size
            c.mm[value_at : value_at + 1] = b"X"
    assert other.get(b"torn") is None
    c.put(b"torn", b"third", 60)
    assert other.get(b"torn") == b"third"


def _ticket_server(secret: str, certs: tuple[str, str]) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen([sys.executable, "-m", "tests.support_tls_tickets", secret, *certs],
                         cwd=str(REPO), stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        return p, _listening(p)
    except BaseException:
        p.kill()
        p.wait(5)
        raise


@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
@pytest.mark.parametrize("same_secret", [True, False])
def test_shared_ticket_keys_resume_anywhere(tmp_path, certs, version, same_secret):
    procs: list[subprocess.Popen[str]] = []
    ports: list[int] = []
    try:
        for secret in ("cluster-a", "cluster-a" if same_secret else "other"):
            p, port = _ticket_server(secret, certs)
            procs.append(p)
            ports.append(port)
        sess = tmp_path / "t.pem"
        assert "\nNew, TLSv1." in _s_client(ports[0], version, "-sess_out", sess)
        second = _s_client(ports[1], version, "-sess_in", sess)
        assert ("\nReused, TLSv1." in second) == same_secret, second[-1500:]
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
