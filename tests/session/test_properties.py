"""Property tests (hypothesis) for the two places where untrusted input meets the core:

(a) path confinement: for any cwd/argument, `Home.resolve` either refuses with
    PathError or returns a path whose real path lies inside the home, even with
    symlinks pointing inside, outside, in loops, or nowhere;
(b) the command parser and the sans-IO session: no byte sequence (CR, LF, NUL,
    0xFF, Telnet IAC, over-long lines, real verbs with junk arguments) makes
    `parse_line` or `Session.receive_data` raise, and every reply encodes to a
    well-formed FTP reply.

Example counts are chosen to keep the file well under 20 s."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ftpcluster.worker.fs import Home, PathError
from ftpcluster.worker.protocol import (
    Close,
    OpenPassive,
    Reply,
    RunBlocking,
    StartTLS,
    Transfer,
    TransferResult,
    VerifyPassword,
)
from ftpcluster.worker.session import Session, SessionSettings, User, parse_line

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------- (a) path confinement
@pytest.fixture(scope="module")
def home_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home with links that stay inside, leave it, loop, dangle, or climb."""
    base = tmp_path_factory.mktemp("fs")
    home = base / "home"
    outside = base / "outside"
    (home / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (home / "file.txt").write_bytes(b"f")
    (home / "in_link").symlink_to("a")
    (home / "a" / "deep_in").symlink_to("../a/b")
    (home / "out_link").symlink_to(outside)
    (home / "rel_out").symlink_to("../outside")
    (home / "a" / "rel_out2").symlink_to("../../outside/secret")
    (home / "abs_root").symlink_to("/")
    (home / "up_link").symlink_to("..")
    (home / "self").symlink_to(".")
    (home / "loop1").symlink_to("loop2")
    (home / "loop2").symlink_to("loop1")
    (home / "dangling_in").symlink_to("nowhere")
    (home / "dangling_out").symlink_to("../outside/nowhere")
    (home / "a" / "b" / "to_out_via_in").symlink_to("../../rel_out")
    yield home


PIECES = ["..", ".", "", "a", "b", "a/b", "file.txt", "in_link", "deep_in", "out_link", "rel_out", "rel_out2",
          "abs_root", "up_link", "self", "loop1", "dangling_in", "dangling_out", "to_out_via_in", "secret", "etc",
          "passwd", "~", "...", "\\..", "..\\", "%2e%2e", "\x00", "\n", ".ftpcluster-upload.x", "ü文件"]

piece_paths = st.builds(
    lambda lead, parts, trail: lead + "/".join(parts) + trail,
    st.sampled_from(["", "/", "//", "./", "../"]),
    st.lists(st.sampled_from(PIECES), max_size=8),
    st.sampled_from(["", "/", "/.", "/.."]),
)
raw_args = st.binary(max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape"))
args = st.one_of(piece_paths, piece_paths, raw_args, st.text(max_size=40))


def _inside(root: str, real: str) -> bool:
    return os.path.commonpath([root, real]) == root


@settings(FAST, max_examples=400)
@given(cwd_arg=piece_paths, arg=args)
def test_resolve_never_escapes(home_tree: Path, cwd_arg: str, arg: str) -> None:
    home = Home(str(home_tree))
    root = os.path.realpath(home_tree)
    # A session's cwd is always the virtual result of an earlier successful resolve.
    try:
        cwd = home.resolve("/", cwd_arg).virtual
    except PathError:
        cwd = "/"
    for must_exist in (False, True):
        try:
            r = home.resolve(cwd, arg, must_exist)
        except PathError:
            continue
        real = os.path.realpath(r.real)
        assert _inside(root, real), (cwd, arg, r)
        assert r.virtual.startswith("/") and "/../" not in r.virtual + "/" and "\x00" not in r.virtual
        assert not any(p.startswith(".ftpcluster-upload.") for p in r.virtual.split("/"))
        if must_exist:
            assert os.path.lexists(real)


@pytest.mark.parametrize(
    "arg",
    ["out_link", "out_link/secret", "rel_out", "a/rel_out2", "abs_root/etc/passwd", "up_link/outside",
     "dangling_out", "a/b/to_out_via_in/secret", "in_link/../rel_out", "../outside/secret", "a\\..\\..", "x\x00"],
)
def test_known_escapes_refused(home_tree: Path, arg: str) -> None:
    with pytest.raises(PathError):
        Home(str(home_tree)).resolve("/", arg)


def test_inside_links_allowed(home_tree: Path) -> None:
    home = Home(str(home_tree))
    assert home.resolve("/", "in_link/b", True).real == os.path.realpath(home_tree / "a" / "b")
    assert home.resolve("/a", "deep_in", True).real == os.path.realpath(home_tree / "a" / "b")
    assert home.resolve("/a/b", "../..", True).virtual == "/"


# ---------------------------------------------------------------- (b) parser and session
VERBS = [b"USER", b"PASS", b"QUIT", b"REIN", b"NOOP", b"SYST", b"FEAT", b"OPTS", b"HELP", b"STAT", b"TYPE", b"MODE",
         b"STRU", b"PWD", b"CWD", b"CDUP", b"MKD", b"RMD", b"DELE", b"RNFR", b"RNTO", b"SIZE", b"MDTM", b"MFMT",
         b"LIST", b"NLST", b"MLSD", b"MLST", b"RETR", b"STOR", b"STOU", b"APPE", b"REST", b"ABOR", b"PASV", b"EPSV",
         b"PORT", b"EPRT", b"ALLO", b"SITE", b"XPWD", b"XCWD", b"XMKD", b"XRMD", b"XCUP", b"AUTH", b"PBSZ", b"PROT",
         b"CCC", b"ACCT", b"GET", b"noop", b"rEtR", b"\xff\xf4\xff\xf2ABOR"]
ARG_BITS = [b"", b" ", b"..", b"/", b"a", b"ALL", b"A", b"I", b"ON", b"UTF8", b"MLST type;size;", b"CHMOD 777 a",
            b"HELP", b"127,0,0,1,4,1", b"|1|127.0.0.1|5000|", b"|2|::1|5000|", b"20200101000000 a", b"-la", b"0",
            b"P", b"TLS", b"\x00", b"\xff", b"\r", b"\\..\\", b"99999999999999999999", b"\xc3\xbc\xe6\x96\x87"]

command_lines = st.builds(
    lambda verb, parts: verb + (b" " + b"".join(parts) if parts else b""),
    st.sampled_from(VERBS),
    st.lists(st.one_of(st.sampled_from(ARG_BITS), st.binary(max_size=12)), max_size=4),
)
long_lines = st.builds(lambda n, c: c * n, st.integers(500, 6000), st.sampled_from([b"A", b"\x00", b"\xff", b" "]))
lines = st.one_of(command_lines, command_lines, st.binary(max_size=80), long_lines)
streams = st.builds(
    lambda ls, seps: b"".join(line + sep for line, sep in zip(ls, seps)),
    st.lists(lines, max_size=12),
    st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\x00\n"]), min_size=12, max_size=12),
)
REPLY_LINE = re.compile(rb"^(\d{3}[ -]| ).*$")


@settings(FAST, max_examples=500)
@given(st.one_of(st.binary(max_size=200), lines))
def test_parse_line_never_raises(line: bytes) -> None:
    verb, arg = parse_line(line)
    assert verb is None or (verb.isalnum() and verb == verb.upper() and len(verb) <= 16)
    assert isinstance(arg, str)


@pytest.fixture(scope="module")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("sess") / "home"
    (home / "a").mkdir(parents=True)
    (home / "a" / "f.txt").write_bytes(b"abc")
    (home / "file.txt").write_bytes(b"x" * 100)
    (home / "out").symlink_to("/")
    return home


def _drive(s: Session, outputs: list, home: Path, depth: int = 0) -> None:
    """Play the I/O layer: check replies, answer every asynchronous action."""
    for out in outputs:
        if isinstance(out, Reply):
            wire = out.encode()
            assert wire.endswith(b"\r\n")
            for line in wire[:-2].split(b"\r\n"):
                assert REPLY_LINE.match(line), wire
            assert 100 <= out.code <= 599
            continue
        if depth > 50 or s.closed:
            continue
        if isinstance(out, VerifyPassword):
            user = User(out.user, str(home), read_only=out.user == "bob") if out.password == "pw" else None
            _drive(s, s.auth_done(user), home, depth + 1)
        elif isinstance(out, OpenPassive):
            _drive(s, s.passive_ready("127.0.0.1", 50000, out.extended), home, depth + 1)
        elif isinstance(out, Transfer):
            if out.lines is not None:
                for _ in out.lines:  # built off the loop (RunBlocking), sent by the I/O layer
                    pass
            _drive(s, s.transfer_done(TransferResult("ok", bytes=1)), home, depth + 1)
        elif isinstance(out, RunBlocking):  # control.py runs it on a thread
            try:
                result = out.call()
            except Exception as e:  # noqa: BLE001
                result = e
            _drive(s, s.blocking_done(result), home, depth + 1)
        elif isinstance(out, StartTLS):
            _drive(s, s.tls_done(), home, depth + 1)
        elif isinstance(out, Close):
            assert s.closed


@settings(FAST, max_examples=500)
@given(
    data=streams,
    cuts=st.lists(st.integers(0, 4000), max_size=6),
    login=st.sampled_from([b"", b"USER alice\r\nPASS pw\r\n", b"USER bob\r\nPASS pw\r\n", b"USER x\r\nPASS no\r\n"]),
    tls=st.booleans(),
    max_line=st.sampled_from([512, 4096]),
)
def test_session_receive_data_never_raises(
    session_home: Path, data: bytes, cuts: list[int], login: bytes, tls: bool, max_line: int
) -> None:
    s = Session(SessionSettings(max_line=max_line, tls_available=tls), client_ip="127.0.0.1", session_id="1-1-1")
    _drive(s, s.greeting(), session_home)
    stream = login + data
    # Feed in arbitrary pieces: lines split across reads must not matter.
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(points, points[1:]):
        _drive(s, s.receive_data(stream[a:b]), session_home)
    _drive(s, s.receive_data(b"\r\nNOOP\r\n"), session_home)
    event("logged in" if s.user is not None else "closed" if s.closed else "not logged in")
    assert s.cwd.startswith("/")
    if s.home is not None:
        assert os.path.realpath(s.home.real_of(s.cwd)).startswith(os.path.realpath(session_home))
