"""Rules the command table answers for every verb: argument checks, "530 log in
first", read-only refusals, what may run during a transfer, HELP; and the table
itself (built from an explicit list of modules, replaceable per session)."""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType
from typing import Callable

import pytest

from ftpcluster.worker import command_table, commands
from ftpcluster.worker.command_table import COMMAND_TABLE
from ftpcluster.worker.commands import Arg, build_table, command
from ftpcluster.worker.session import Session

from .driver import Driver

VERBS = sorted(COMMAND_TABLE)
SPEC = COMMAND_TABLE
# Arguments that pass the table's checks for each verb (the handler may still refuse them).
SAMPLE_ARG = {"PORT": "127,0,0,1,200,10", "EPRT": "|1|127.0.0.1|51210|", "TYPE": "I", "MODE": "S", "STRU": "F",
              "REST": "0", "PBSZ": "0", "PROT": "C", "AUTH": "TLS", "OPTS": "UTF8 ON", "SITE": "HELP",
              "MFMT": "20200101000000 f.txt", "HOST": "example.com"}  # fmt: skip


def line_for(verb: str) -> str:
    """`verb` with an argument the table accepts (none for verbs that take none)."""
    arg = "" if SPEC[verb].arg is Arg.NONE else SAMPLE_ARG.get(verb, "f.txt")
    return f"{verb} {arg}".rstrip()


def test_table_covers_rfc_959_and_extensions() -> None:
    rfc959 = {"USER", "PASS", "ACCT", "CWD", "CDUP", "REIN", "QUIT", "PORT", "PASV", "TYPE", "STRU", "MODE", "RETR",
              "STOR", "STOU", "APPE", "ALLO", "REST", "RNFR", "RNTO", "ABOR", "DELE", "RMD", "MKD", "PWD", "LIST",
              "NLST", "SITE", "SYST", "STAT", "HELP", "NOOP"}  # fmt: skip
    ext = {"FEAT", "OPTS", "EPSV", "EPRT", "SIZE", "MDTM", "MLST", "MLSD", "MFMT", "AUTH", "PBSZ", "PROT", "CCC", "HOST",
           "XPWD", "XCWD", "XCUP", "XMKD", "XRMD"}  # fmt: skip
    assert rfc959 | ext == set(VERBS)


@pytest.mark.parametrize("verb", [v for v in VERBS if SPEC[v].arg is Arg.REQUIRED])
def test_missing_argument_is_501(make: Callable[..., Driver], verb: str) -> None:
    d = make("alice")
    r = d.reply(verb)
    assert r.code == 501 and verb in r.text


@pytest.mark.parametrize("verb", [v for v in VERBS if SPEC[v].arg is Arg.NONE])
def test_surplus_argument_is_501(make: Callable[..., Driver], verb: str) -> None:
    d = make("alice")
    assert d.code(f"{verb} x") == 501
    assert d.code("NOOP") == 200  # the session goes on


@pytest.mark.parametrize("verb", [v for v in VERBS if SPEC[v].auth])
def test_login_first_is_530(make: Callable[..., Driver], verb: str) -> None:
    d = make()
    assert d.code(line_for(verb)) == 530
    assert d.actions == []  # nothing was started, not even a filesystem call


@pytest.mark.parametrize("verb", [v for v in VERBS if not SPEC[v].auth and v not in ("QUIT", "PASS", "REIN")])
def test_no_login_needed(make: Callable[..., Driver], verb: str) -> None:
    arg = SAMPLE_ARG.get(verb, "x") if SPEC[verb].arg is Arg.REQUIRED else ""
    assert make().code(f"{verb} {arg}".rstrip()) != 530


@pytest.mark.parametrize("verb", [v for v in VERBS if SPEC[v].write])
def test_write_commands_refused_for_read_only(make: Callable[..., Driver], verb: str) -> None:
    d = make("bob")
    before = sorted(p.name for p in d.home.rglob("*"))
    r = d.reply(line_for(verb))
    assert r.code == 550 and "read-only" in r.text
    assert sorted(p.name for p in d.home.rglob("*")) == before


def test_site_chmod_refused_for_read_only(make: Callable[..., Driver]) -> None:
    d = make("bob")
    mode = (d.home / "f.txt").stat().st_mode
    assert d.code("SITE CHMOD 777 f.txt") == 550
    assert (d.home / "f.txt").stat().st_mode == mode
    assert d.code("SITE HELP") == 214  # other SITE commands are not writes


@pytest.mark.parametrize("verb", VERBS)
def test_during_a_transfer(make: Callable[..., Driver], verb: str) -> None:
    """The urgent commands (ABOR STAT NOOP QUIT) run at once, REIN and USER are answered
    at once; everything else waits in order and is answered after the transfer's 226."""
    d = make("alice")
    d.hold_transfers = True
    assert d.code("EPSV") == 229
    assert [r.code for r in d.send("RETR f.txt")] == [150]
    spec = SPEC[verb]
    got = [r.code for r in d.send(line_for(verb))]
    if verb == "ABOR":
        assert got == [426, 226] and d.held is None
        return
    if verb == "QUIT":
        assert got == [] and [r.code for r in d.finish()] == [226, 221] and d.s.closed
        return
    if spec.urgent or spec.in_transfer:
        assert len(got) == 1 and got[0] >= 200, got
        assert [r.code for r in d.finish()] == [226]
    else:
        assert got == []
        after = [r.code for r in d.finish()]
        assert len(after) >= 2 and after[0] == 226, after


@pytest.mark.parametrize("verb", VERBS)
def test_help_for_each_verb(make: Callable[..., Driver], verb: str) -> None:
    r = make().reply(f"HELP {verb.lower()}")
    assert r.code == 214 and r.text == SPEC[verb].help and r.text


def test_help_lists_every_verb(make: Callable[..., Driver]) -> None:
    r = make().reply("HELP")
    assert r.code == 214
    shown = " ".join(r.text[1:-1]).split()
    assert shown == VERBS


def test_table_is_built_from_the_listed_modules() -> None:
    assert build_table(command_table.HANDLER_MODULES) == dict(COMMAND_TABLE)
    assert commands.load_handlers() == dict(COMMAND_TABLE)
    assert not hasattr(commands, "COMMANDS")  # no global filled by imports
    only_auth = build_table([command_table.handlers_auth])
    assert set(only_auth) == {"USER", "PASS", "ACCT", "REIN", "QUIT", "HOST"}


def test_a_verb_claimed_twice_is_an_error() -> None:
    twin = ModuleType("twin")

    @command("NOOP", auth=False)
    def noop(s: Session, arg: str) -> None:
        s.reply(200, "twin")

    twin.noop = noop  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="NOOP"):
        build_table([*command_table.HANDLER_MODULES, twin])


def test_a_session_over_another_table(home: object) -> None:
    """A test (or another product) can run a session with its own table."""
    calls: list[str] = []

    def hello(s: Session, arg: str) -> None:
        calls.append(arg)
        s.reply(200, f"hello {arg}")

    table = {"HI": replace(SPEC["NOOP"], verb="HI", handler=hello, arg=Arg.REQUIRED), "QUIT": SPEC["QUIT"]}
    d = Driver(home, commands=table)  # type: ignore[arg-type]
    assert d.code("NOOP") == 500  # not in this table
    assert d.reply("HI you").text == "hello you" and calls == ["you"]
    assert d.code("QUIT") == 221


def test_a_handler_bug_is_451_logged_once(home: object) -> None:
    def boom(s: Session, arg: str) -> None:
        raise KeyError("bug")

    d = Driver(home, commands={**SPEC, "SYST": replace(SPEC["SYST"], handler=boom)})  # type: ignore[arg-type]
    assert [r.code for r in d.feed(b"SYST\r\nNOOP\r\n")] == [451, 200]
    errors = [e for e in d.events if e.name == "handler_error"]
    assert len(errors) == 1 and "KeyError" in errors[0].fields["traceback"]
