"""Fuzz the sans-IO session with random command lines (hypothesis), no server process.

Properties, for any mix of real verbs, junk, odd Unicode digits and paths:
- every command line gets exactly one final reply (2xx-5xx), at most one 1xx
  before it (150 of a transfer); lines after the session closed get none;
- pipelined lines (all in one read, while a password check, a passive port or a
  transfer is still outstanding) all get their replies, in the same number, and
  the session never holds more than MAX_QUEUED_LINES parsed commands: the rest
  waits unsplit while the I/O layer stops reading (`Session.backlogged`);
- no handler raises (the session would answer 451 and emit `handler_error`).

The test plays the I/O layer the way control.py does: replies are recorded,
actions are answered (password ok for "pw", a passive port, a transfer that
succeeds, or is aborted by ABOR, a TLS switch)."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftpcluster.worker.protocol import (
    AbortTransfer,
    Close,
    Event,
    OpenPassive,
    Reply,
    RunBlocking,
    StartTLS,
    Transfer,
    TransferResult,
    VerifyPassword,
)
from ftpcluster.worker.session import MAX_QUEUED_LINES, Session, SessionSettings, User

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPLY_LINE = re.compile(rb"^(\d{3}[ -]| ).*$")

VERBS = ["USER", "PASS", "REIN", "NOOP", "SYST", "FEAT", "OPTS", "HELP", "STAT", "TYPE", "MODE", "STRU", "PWD",
         "CWD", "CDUP", "MKD", "RMD", "DELE", "RNFR", "RNTO", "SIZE", "MDTM", "MFMT", "LIST", "NLST", "MLSD",
         "MLST", "RETR", "STOR", "STOU", "APPE", "REST", "ABOR", "PASV", "EPSV", "PORT", "EPRT", "ALLO", "SITE",
         "XPWD", "XCWD", "XMKD", "XRMD", "XCUP", "AUTH", "PBSZ", "PROT", "CCC", "ACCT", "noop", "rEtR", "XYZZY"]
# Unicode digits that str.isdigit()/int() accept: superscript, Arabic-Indic, full-width, Devanagari.
ODD_DIGITS = ["²", "٣", "５", "१", "¹²", "1²", "٠٠"]
ARGS = ["", "a", "f.txt", "d", "d/g.txt", "/", "..", "../..", "in_link", "out_link", "dangling", "-la", "-l d",
        "ALL", "1", "2", "3", "A", "I", "L 8", "E", "S", "F", "P", "C", "TLS", "SSL", "ON", "UTF8",
        "UTF8 ON", "MLST type;size;", "CHMOD 755 f.txt", "CHMOD 999 f.txt", "HELP", "0", "99999999999999999999",
        "127,0,0,1,4,1", "127,0,0,1,256,1", "10,0,0,1,4,1", "|1|127.0.0.1|5000|", "|2|::1|5000|", "|1|127.0.0.1|0|",
        "20200101000000 f.txt", "20201301000000 f.txt", "alice", "bob", "pw", "nope", "anonymous",
        "\x00", "\\..\\", "ü文件", "a b", " ", "\t", "%s%n", "\ufffd"]
ODD_ARGS = [f"127,0,0,1,{d},1" for d in ODD_DIGITS] + [f"|1|127.0.0.1|{d}|" for d in ODD_DIGITS] + [
    *ODD_DIGITS, *(f"2020010100000{d} f.txt" for d in ODD_DIGITS), *(f"CHMOD {d} f.txt" for d in ODD_DIGITS)]

words = st.one_of(st.sampled_from(ARGS), st.sampled_from(ODD_ARGS), st.text(max_size=10).map(lambda t: t.replace("\n", "")))
command_line = st.builds(lambda v, a: (v + " " + a if a else v).encode("utf-8", "surrogatepass"),
                         st.sampled_from(VERBS), words)
junk_line = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))
any_line = st.one_of(command_line, command_line, command_line, junk_line)
LOGIN = [b"USER alice", b"PASS pw"]


_serial = itertools.count()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _home(base: Path) -> Path:
    """A fresh home per example: handlers really delete, rename and chmod in it."""
    home = base / f"h{next(_serial)}"
    (home / "d").mkdir(parents=True)
    (home / "d" / "g.txt").write_bytes(b"g")
    (home / "f.txt").write_bytes(b"x" * 10)
    (home / "in_link").symlink_to("f.txt")
    (home / "out_link").symlink_to("/etc/passwd")
    (home / "dangling").symlink_to("nowhere")
    return home


class Driver:
    """Plays control.py: answers actions after each read, counts replies per line."""

    def __init__(self, home: Path, settings_: SessionSettings, **session_args: object) -> None:
        self.home = home
        self.s = Session(settings_, client_ip="127.0.0.1", session_id="1-1-1", **session_args)  # type: ignore[arg-type]
        self.replies: list[Reply] = []
        self.actions: list[object] = []
        self.errors: list[Event] = []
        self.take(self.s.greeting())
        self.replies.clear()

    def take(self, outputs: list) -> None:
        for out in outputs:
            if isinstance(out, Reply):
                wire = out.encode()
                assert wire.endswith(b"\r\n") and 100 <= out.code <= 599
                assert all(REPLY_LINE.match(line) for line in wire[:-2].split(b"\r\n")), wire
                self.replies.append(out)
            elif isinstance(out, Event):
                if out.name == "handler_error":
                    self.errors.append(out)
            elif isinstance(out, AbortTransfer):
                # ABOR cancels the running transfer: it reports "aborted".
                self.actions = [TransferResult("aborted") if isinstance(a, Transfer) else a for a in self.actions]
            elif not isinstance(out, Close):
                self.actions.append(out)
        assert len(self.s._queue) <= MAX_QUEUED_LINES

    def settle(self) -> None:
        """Answer outstanding actions one by one, as their results would arrive."""
        for _ in range(10_000):
            if not self.actions:
                return
            a = self.actions.pop(0)
            if self.s.closed:
                continue
            if isinstance(a, VerifyPassword):
                ok = a.password == "pw" and a.user in ("alice", "bob")
                self.take(self.s.auth_done(User(a.user, str(self.home), read_only=a.user == "bob") if ok else None))
            elif isinstance(a, OpenPassive):
                self.take(self.s.passive_ready("127.0.0.1", 50000, a.extended))
            elif isinstance(a, Transfer):
                if a.lines is not None:
                    for _chunk in a.lines:  # listings come built (RunBlocking), the I/O layer sends them
                        pass
                self.take(self.s.transfer_done(TransferResult("ok", bytes=1)))
            elif isinstance(a, TransferResult):
                self.take(self.s.transfer_done(a))
            elif isinstance(a, RunBlocking):  # control.py runs it on a thread
                try:
                    result = a.call()
                except Exception as e:  # noqa: BLE001
                    result = e
                self.take(self.s.blocking_done(result))
            elif isinstance(a, StartTLS):
                self.take(self.s.tls_done())
        raise AssertionError("actions never settled")

    def finals(self) -> int:
        return sum(1 for r in self.replies if r.code >= 200)


@settings(FUZZ, max_examples=150)
@given(lines=st.lists(any_line, max_size=25), login=st.booleans(), tls=st.booleans())
def test_every_line_gets_exactly_one_reply(base: Path, lines: list[bytes], login: bool, tls: bool) -> None:
    d = Driver(_home(base), SessionSettings(tls_available=tls, max_login_attempts=1000))
    for line in (LOGIN if login else []) + lines:
        was_closed = d.s.closed
        d.replies.clear()
        d.take(d.s.receive_data(line + b"\r\n"))
        d.settle()
        codes = [r.code for r in d.replies]
        if was_closed:
            assert codes == [], (line, codes)
            continue
        assert d.finals() == 1, (line, codes)
        assert len(codes) <= 2 and all(c >= 200 for c in codes[1:]), (line, codes)
    assert not d.errors, d.errors[0].fields.get("traceback")


PIPELINE_VERBS = ["NOOP", "PWD", "TYPE I", "SYST", "STAT", "SIZE f.txt", "MLST f.txt", "REST 5", "REST ²",
                  "PORT 127,0,0,1,²,1", "EPRT |1|127.0.0.1|²|", "PASV", "EPSV", "LIST", "RETR f.txt", "ABOR",
                  "CWD d", "CDUP", "HELP", "FEAT", "BOGUS", "STOR up.bin", "USER alice", "PASS pw"]


@settings(FUZZ, max_examples=100)
@given(lines=st.lists(st.one_of(st.sampled_from(PIPELINE_VERBS).map(str.encode), command_line), min_size=1, max_size=120),
       cuts=st.lists(st.integers(0, 10_000), max_size=4))
def test_pipelined_lines_all_answered(base: Path, lines: list[bytes], cuts: list[int]) -> None:
    """All lines sent at once behind a password check: nothing is dropped."""
    lines = [ln for ln in lines if not ln.upper().startswith((b"QUIT", b"AUTH", b"REIN"))]  # these end or reset the stream
    d = Driver(_home(base), SessionSettings(max_login_attempts=1000))
    stream = b"".join(line + b"\r\n" for line in LOGIN + lines)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(points, points[1:]):
        d.take(d.s.receive_data(stream[a:b]))
        # The I/O layer reads on only when the session has room (control.py's _flow).
        assert d.s.backlogged == (len(d.s._queue) >= MAX_QUEUED_LINES)
        d.settle()
    d.settle()
    assert not d.errors, d.errors[0].fields.get("traceback")
    assert not d.s.backlogged and d.s._lines.pending == 0
    assert d.finals() == len(LOGIN) + len(lines), [r.code for r in d.replies]


def test_backlog_stops_taking_lines(base: Path) -> None:
    """100 commands behind PASS: 32 are queued, the rest stay unsplit in the line buffer
    until the password check answers; then all 102 lines get their reply."""
    d = Driver(_home(base), SessionSettings())
    d.take(d.s.receive_data(b"USER alice\r\nPASS pw\r\n" + b"PWD\r\n" * 100))
    assert d.s.backlogged and len(d.s._queue) == MAX_QUEUED_LINES
    assert d.s._lines.pending == (100 - MAX_QUEUED_LINES) * 5
    d.settle()
    assert not d.s.backlogged
    assert [r.code for r in d.replies] == [331, 230] + [257] * 100


def test_odd_digits_get_501_and_session_goes_on(base: Path) -> None:
    d = Driver(_home(base), SessionSettings())
    for line in (b"USER alice", b"PASS pw"):
        d.take(d.s.receive_data(line + b"\r\n"))
        d.settle()
    d.replies.clear()
    for cmd in ("REST ²", "PORT 127,0,0,1,²,1", "EPRT |1|127.0.0.1|²|", "REST ٣", "PBSZ ²", "SITE CHMOD ٧٥٥ f.txt",
                "MFMT 2020010100000٣ f.txt", "NOOP"):
        d.take(d.s.receive_data(cmd.encode() + b"\r\n"))
        d.settle()
    assert [r.code for r in d.replies] == [501, 501, 501, 501, 503, 501, 501, 200]
    assert not d.errors
    assert os.path.exists(d.home / "f.txt")


def test_unexpected_exception_is_451_and_logged_once(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a handler: 451, one handler_error event with the traceback, session goes on."""
    from dataclasses import replace

    from ftpcluster.worker.command_table import COMMAND_TABLE

    def boom(s: Session, arg: str) -> None:
        raise KeyError("bug")

    table = {**COMMAND_TABLE, "SYST": replace(COMMAND_TABLE["SYST"], handler=boom)}
    d = Driver(_home(base), SessionSettings(), commands=table)
    d.take(d.s.receive_data(b"SYST\r\nNOOP\r\n"))
    assert [r.code for r in d.replies] == [451, 200]
    assert len(d.errors) == 1 and "KeyError" in d.errors[0].fields["traceback"]
