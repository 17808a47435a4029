"""RFC 4217 negotiation in the core: AUTH, PBSZ, PROT, CCC, the TLS switch as a
state, what was sent in the clear behind AUTH, and the [tls] required modes.
The handshakes themselves are end to end (tests/test_ftps.py)."""

from __future__ import annotations

from typing import Callable

import pytest

from ftpcluster.worker.protocol import StartTLS, Transfer
from ftpcluster.worker.state import State

from .driver import Driver


def test_auth_tls_step_by_step(make: Callable[..., Driver]) -> None:
    d = make(tls_available=True)
    d.auto_tls = False
    r = d.reply("AUTH TLS")
    assert (r.code, r.text) == (234, "AUTH TLS successful")
    assert isinstance(d.actions[-1], StartTLS) and d.s.state is State.TLS
    assert "TLSHandshake" in d.event_names()
    # Nothing is taken as a command until the switch is done.
    assert d.feed(b"USER alice\r\n") == []
    d.take(d.s.tls_done())
    assert d.s.state is State.READY and d.s.tls_control
    assert d.s._lines.pending == 0  # the cleartext line is gone (CVE-2011-0411)
    assert d.code("USER alice") == 331


def test_plaintext_pipelined_after_auth_tls_is_discarded(make: Callable[..., Driver]) -> None:
    d = make(tls_available=True)
    d.auto_tls = False
    got = d.feed(b"AUTH TLS\r\nUSER alice\r\nPASS s3cret-pw\r\nDELE f.txt\r\n")
    assert [r.code for r in got] == [234]
    d.take(d.s.tls_done())
    assert d.s.user is None and (d.home / "f.txt").exists()
    assert len(d.replies) == 2  # greeting and 234: nothing answered the injected lines


@pytest.mark.parametrize("mech,private", [("TLS", False), ("tls", False), ("TLS-C", False), ("SSL", True),
                                          ("TLS-P", True)])
def test_auth_mechanisms(make: Callable[..., Driver], mech: str, private: bool) -> None:
    """AUTH SSL and TLS-P imply protected data (draft-murray-auth-ftp-ssl)."""
    d = make(tls_available=True)
    assert d.code(f"AUTH {mech}") == 234
    assert (d.s.pbsz, d.s.prot_private) == (private, private)


@pytest.mark.parametrize("line,code", [("AUTH", 501), ("AUTH KERBEROS_V4", 504), ("AUTH GSSAPI", 504),
                                       ("PBSZ 0", 503), ("PROT P", 503), ("PROT C", 503), ("CCC", 534)])
def test_before_auth(make: Callable[..., Driver], line: str, code: int) -> None:
    assert make(tls_available=True).code(line) == code


def test_auth_without_tls_configured_is_502(make: Callable[..., Driver]) -> None:
    d = make()
    assert d.code("AUTH TLS") == 502 and d.s.state is State.READY
    assert "AUTH TLS" not in d.text("FEAT")


def test_auth_twice_or_after_login(make: Callable[..., Driver]) -> None:
    d = make(tls_available=True)
    assert d.code("AUTH TLS") == 234
    assert d.reply("AUTH TLS").text == "TLS already active on the control channel"
    d2 = make("alice", tls_available=True)
    assert "before login" in d2.reply("AUTH TLS").text


def test_pbsz_then_prot(make: Callable[..., Driver]) -> None:
    d = make(tls_available=True)
    assert d.code("AUTH TLS") == 234
    assert d.reply("PROT P").text == "PBSZ must come before PROT"
    assert d.code("PBSZ x") == 501
    assert d.code("PBSZ ²") == 501
    assert d.reply("PBSZ 0").text == "PBSZ=0"
    for line, code, private in (("PROT P", 200, True), ("PROT C", 200, False), ("prot p", 200, True),
                                ("PROT S", 536, True), ("PROT E", 536, True), ("PROT X", 504, True)):  # fmt: skip
        assert d.code(line) == code, line
        assert d.s.prot_private is private, line
    assert d.code("CCC") == 534
    assert "data: private" in d.text("STAT") and "Control channel: TLS" in d.text("STAT")


def test_feat_lists_tls_when_available(make: Callable[..., Driver]) -> None:
    feat = make(tls_available=True).text("FEAT").split("\n")
    assert feat[1:5] == [" AUTH TLS", " AUTH SSL", " PBSZ", " PROT"]


def test_prot_p_marks_transfers_protected(make: Callable[..., Driver]) -> None:
    d = make(tls_available=True)
    for line in ("AUTH TLS", "PBSZ 0", "PROT P"):
        d.code(line)
    d.login()
    assert d.code("EPSV") == 229 and d.code("RETR f.txt") == 226
    t = [a for a in d.actions if isinstance(a, Transfer)][-1]
    assert t.protected


@pytest.mark.parametrize("required", ["control", "both"])
def test_required_control(make: Callable[..., Driver], required: str) -> None:
    d = make(tls_available=True, tls_required=required)
    assert "AUTH TLS first" in d.reply("USER alice").text
    assert d.code("PASS x") == 530
    assert d.code("AUTH TLS") == 234
    d.login()


@pytest.mark.parametrize("required,plain_ok", [("data", False), ("both", False), ("control", True), ("off", True)])
def test_required_data(make: Callable[..., Driver], required: str, plain_ok: bool) -> None:
    d = make(tls_available=True, tls_required=required)
    d.code("AUTH TLS")
    d.login()
    assert d.code("EPSV") == 229
    assert d.code("LIST") == (226 if plain_ok else 521)
    d.code("PBSZ 0")
    d.code("PROT P")
    assert d.code("EPSV") == 229 and d.code("LIST") == 226


def test_implicit_tls_starts_protected(make: Callable[..., Driver]) -> None:
    d = make(tls_available=True, implicit_tls=True, tls_required="both")
    assert (d.s.tls_control, d.s.pbsz, d.s.prot_private) == (True, True, True)
    assert d.code("AUTH TLS") == 503
    d.login()
    assert d.code("EPSV") == 229 and d.code("RETR f.txt") == 226
