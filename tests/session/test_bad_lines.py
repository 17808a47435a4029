"""Broken and hostile command lines against the session core: junk bytes, lines
split anywhere, over-long lines, unknown verbs and other protocols, arguments
out of range. (Moved from tests/test_bad_input.py; the socket-level cases, a
client vanishing mid-transfer, stay there.)"""

from __future__ import annotations

import random
from typing import Callable

import pytest

from .driver import Driver


def test_garbage_and_binary_junk(make: Callable[..., Driver]) -> None:
    rng = random.Random(959)
    d = make()
    for logged_in in (False, True):
        lines = [bytes(b for b in rng.randbytes(rng.randrange(1, 300)) if b != 0x0A) for _ in range(40)]
        got = d.feed(b"".join(line + b"\r\n" for line in lines))
        assert len(got) == len(lines) and all(400 <= r.code < 600 for r in got), [r.code for r in got]
        assert d.code("NOOP") == 200
        if not logged_in:
            d.login()
    # Bytes that are not a verb at all, NULs inside a verb, a verb too long to be one.
    for line in (b"\x00\x00\x00", b"\xff\xfe\xfd", b"NO\x00OP", b"1234", b"A" * 40, b"  ", b"", b"\r\r\r"):
        assert d.code(line) == 500, line
    assert d.code("PWD") == 257
    assert not [e for e in d.events if e.name == "handler_error"]


def test_telnet_interrupt_before_abor_is_skipped(make: Callable[..., Driver]) -> None:
    """Clients send IAC IP IAC DM before ABOR (RFC 959 4.1.3): the verb is still found."""
    d = make("alice")
    assert d.code(b"\xff\xf4\xff\xf2ABOR") == 225
    assert d.code(b"\tnoop") == 200


def test_lines_split_anywhere(make: Callable[..., Driver]) -> None:
    d = make()
    assert d.feed(b"US") == [] and d.feed(b"ER alice\r") == []
    assert [r.code for r in d.feed(b"\n")] == [331]
    assert [r.code for r in d.feed(b"PASS s3cret-pw\n")] == [230]  # a bare LF ends a line too
    got = []
    for b in b"NOOP\r\n":  # one byte at a time
        got += d.feed(bytes([b]))
    assert [r.code for r in got] == [200]
    assert [r.code for r in d.feed(b"NOOP\r\nPWD\r\nSYST\r\n")] == [200, 257, 215]
    assert d.feed(b"RETR half-a-comm") == []  # half a line waits, unanswered
    assert d.s._lines.pending == len(b"RETR half-a-comm")


def test_100kb_line_refused_session_usable(make: Callable[..., Driver]) -> None:
    d = make("alice")
    r = d.send(b"NOOP " + b"A" * 100_000)
    assert [x.code for x in r] == [500] and "too long" in str(r[0].text).lower()
    assert "BadProtocol" in d.event_names()
    assert d.code("NOOP") == 200  # exactly one reply for the long line; the session goes on
    # The same line trickled in pieces without a LF for a while, then ended.
    got = []
    for _ in range(25):
        got += d.feed(b"B" * 4000)
    got += d.feed(b"\r\n")
    assert [x.code for x in got] == [500]
    assert d.s._lines.pending == 0  # nothing of it was kept
    assert d.code("PWD") == 257
    # Just under the limit is a normal (if odd) command.
    assert d.code("NOOP" + " " * 4000) in (200, 501)
    assert d.code("NOOP") == 200


def test_max_line_is_the_setting(make: Callable[..., Driver]) -> None:
    d = make(max_line=20)
    assert d.code("NOOP " + "x" * 14) == 501  # 20 bytes with its CR
    assert d.code("NOOP " + "x" * 15) == 500


def test_unknown_commands_and_other_protocols(make: Callable[..., Driver]) -> None:
    d = make()
    for line in ("FOO", "XYZZY arg", "RETRX file", "SITE"):
        assert d.code(line) in (500, 501, 502, 530), line
    assert d.reply("FOO").text == "FOO not understood"
    assert [e.fields for e in d.events if e.name == "UnhandledCommand"][0] == {"command": "FOO"}
    assert d.code("HELP FOO") == 502
    d.login()
    assert d.code("FOO bar") == 500
    assert d.code("SITE EXEC /bin/sh") == 500
    assert d.code("NOOP") == 200
    assert not d.server_closed


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"EHLO mail.example.com",
                                  b"CONNECT host:443 HTTP/1.1", b"SSH-2.0-OpenSSH_9.2p1 Debian-2"])
def test_other_protocols_get_one_500_and_a_close(make: Callable[..., Driver], line: bytes) -> None:
    d = make()
    got = d.feed(line + b"\r\nHost: x\r\n\r\n")
    assert [r.code for r in got] == [500] and d.server_closed
    assert "BadProtocol" in d.event_names()


@pytest.mark.parametrize("verb", ["SMNT", "ADAT", "MIC", "CONF", "ENC"])
def test_known_but_not_implemented_is_502(make: Callable[..., Driver], verb: str) -> None:
    assert make("alice").code(f"{verb} x") == 502


def test_commands_out_of_order(make: Callable[..., Driver]) -> None:
    d = make()
    for line in ("RETR x", "STOR x", "LIST", "CWD /", "PASV"):
        assert d.code(line) == 530, line
    assert d.code("PASS nouser") == 503
    d.login()
    assert d.code("RNTO x") == 503
    (d.home / "f").write_bytes(b"x")
    assert d.code("RNFR f") == 350
    assert d.code("RNTO g") == 250
    assert d.code("RNTO h") == 503  # RNFR is used up
    for bad in ("PORT", "PORT nonsense", "PORT 1,2,3", "PORT 1,2,3,4,5,6,7", "PORT 256,0,0,1,4,1",
                "PORT 127,0,0,1,999,1", "PORT -1,0,0,1,4,1", "PORT a,b,c,d,e,f", "PORT 127.0.0.1:2000"):
        assert d.code(bad) == 501, bad
    assert d.code("EPRT |3|127.0.0.1|2000|") == 522  # RFC 2428: protocol not supported
    for bad in ("EPRT nonsense", "EPRT |1|127.0.0.1|99999|", "EPRT |1|127.0.0.1|x|",
                "EPRT |1|not-an-ip|2000|", "EPRT |1|127.0.0.1|0|", "EPRT ||||"):
        assert d.code(bad) == 501, bad
    assert d.code("RETR g") == 425  # no data connection was set up by any of that
    assert d.code("REST -5") == 501
    assert d.code("REST 99999999999999999999999") == 501
    assert d.code("PWD extra") == 501
    assert d.code("RETR") == 501
    assert d.code("NOOP") == 200


ODD_DIGITS = ["²", "٣", "５", "१", "¹²", "1²"]


@pytest.mark.parametrize("digit", ODD_DIGITS)
def test_unicode_digits_are_not_numbers(make: Callable[..., Driver], digit: str) -> None:
    """str.isdigit()/int() accept these; an ASCII protocol field does not."""
    d = make("alice")
    for line in (f"REST {digit}", f"PORT 127,0,0,1,{digit},1", f"EPRT |1|127.0.0.1|{digit}|",
                 f"SITE CHMOD {digit} f.txt", f"MFMT 2020010100000{digit} f.txt", f"EPSV {digit}"):
        assert d.code(line) == 501, line
    assert d.code(f"PBSZ {digit}") == 503  # no TLS yet: the order comes first
    assert d.s.rest == 0 and not d.s.data_ready
