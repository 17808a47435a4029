"""Order rules and the state table: what may follow what, what runs while an
asynchronous step (password check, passive listener, transfer, TLS switch) is
out, and that replies keep the order of the commands."""

from __future__ import annotations

from typing import Callable

import pytest

from ftpcluster.worker.protocol import TransferResult
from ftpcluster.worker.session import MAX_QUEUED_LINES
from ftpcluster.worker.state import TRANSITIONS, LocalProtocolError, State, Step, next_state

from .driver import Driver


# ---------------------------------------------------------------- the table
def test_every_state_can_close_and_closed_stays_closed() -> None:
    for state in State:
        assert next_state(state, Step.CLOSE) is State.CLOSED
    assert all(to is State.CLOSED for to in TRANSITIONS[State.CLOSED].values())


def test_each_wait_ends_only_with_its_own_result() -> None:
    waits = {Step.CHECK_PASSWORD: Step.AUTH_DONE, Step.OPEN_PASSIVE: Step.PASSIVE_DONE,
             Step.RUN_BLOCKING: Step.BLOCKING_DONE, Step.START_TRANSFER: Step.TRANSFER_DONE,
             Step.START_TLS: Step.TLS_DONE}  # fmt: skip
    for start, done in waits.items():
        waiting = next_state(State.READY, start)
        assert waiting is not State.READY
        assert next_state(waiting, done) is State.READY
        for other in set(waits.values()) - {done}:
            with pytest.raises(LocalProtocolError):
                next_state(waiting, other)
        for again in waits:  # no second step while one is out
            with pytest.raises(LocalProtocolError):
                next_state(waiting, again)


def test_a_result_nobody_asked_for_is_a_bug(drv: Driver) -> None:
    with pytest.raises(LocalProtocolError):
        drv.s.transfer_done(TransferResult("ok"))
    with pytest.raises(LocalProtocolError):
        drv.s.auth_done(None)
    assert drv.s.state is State.READY


# ---------------------------------------------------------------- login order
def test_user_pass_order(make: Callable[..., Driver]) -> None:
    d = make()
    assert d.code("PASS x") == 503
    assert d.code("USER alice") == 331
    assert d.s.state is State.READY and d.s.pending_user == "alice"
    d.take(d.s.receive_data(b""))
    assert d.code("PASS wrong") == 530
    assert d.code("PASS s3cret-pw") == 503  # the failed PASS used up the USER


def test_user_again_starts_over_and_keeps_transfer_parameters(drv: Driver) -> None:
    d = drv
    assert d.code("TYPE A") == 200 and d.code("CWD d") == 250
    assert d.code("USER alice") == 331
    assert d.code("PWD") == 530
    assert d.code("PASS s3cret-pw") == 230
    assert d.text("PWD").startswith('257 "/"') and d.s.binary is False


def test_rein_resets_parameters_but_not_tls(make: Callable[..., Driver]) -> None:
    d = make(tls_available=True)
    assert d.code("AUTH TLS") == 234
    d.login()
    for line in ("EPSV ALL", "OPTS MLST size;", "TYPE A", "REST 1", "RNFR f.txt"):
        assert d.code(line) in (200, 350), line
    assert d.code("REIN") == 220
    s = d.s
    assert (s.user, s.binary, s.epsv_all, s.rest, s.rename_from, s.data_ready) == (None, True, False, 0, None, False)
    assert s.mlst_facts == ["type", "size", "modify", "perm", "unix.mode"] and s.tls_control
    assert type(d.actions[-1]).__name__ == "ClosePassive"


def test_host_comes_before_user(make: Callable[..., Driver]) -> None:
    d = make()
    assert d.code("HOST ftp.example.com") == 220
    assert d.code("USER alice") == 331
    assert d.code("HOST x") == 503
    assert d.code("PASS s3cret-pw") == 230
    assert d.code("HOST x") == 503


# ---------------------------------------------------------------- RNFR/RNTO, REST
def test_rnto_must_follow_rnfr_at_once(drv: Driver) -> None:
    d = drv
    assert d.code("RNFR f.txt") == 350
    assert d.code("NOOP") == 200
    assert d.reply("RNTO g.txt").text == "RNFR required first"
    assert d.code("RNFR f.txt") == 350 and d.code("RNTO g.txt") == 250
    assert (d.home / "g.txt").exists()


def test_rest_applies_to_the_next_transfer_only(drv: Driver) -> None:
    d = drv
    assert d.code("REST 1") == 350 and d.code("EPSV") == 229
    assert [r.code for r in d.send("RETR f.txt")] == [150, 226] and d.sent == b"bc"
    assert d.code("EPSV") == 229
    assert [r.code for r in d.send("RETR f.txt")] == [150, 226] and d.sent == b"abc"
    assert d.code("REST 4") == 350 and d.code("EPSV") == 229
    assert d.reply("RETR f.txt").code == 554  # past the end
    assert d.code("REST 1") == 350 and d.code("RETR nope") == 550 and d.s.rest == 0  # used up by the failure


# ---------------------------------------------------------------- while a step is out
def test_commands_behind_a_password_check_wait_in_order(make: Callable[..., Driver]) -> None:
    d = make()
    d.take(d.s.greeting())
    # Hold the password check: answer it by hand.
    out = d.s.receive_data(b"USER alice\r\nPASS s3cret-pw\r\nPWD\r\nNOOP\r\nSYST\r\n")
    codes = [getattr(o, "code", None) for o in out]
    assert d.s.state is State.AUTH
    assert [c for c in codes if c] == [331]  # PWD, NOOP and SYST wait, in order
    from ftpcluster.worker.session import User

    after = [o.code for o in d.s.auth_done(User("alice", str(d.home))) if hasattr(o, "code")]
    assert after == [230, 257, 200, 215] and d.s.state is State.READY


def test_quit_noop_stat_wait_for_a_password_check(make: Callable[..., Driver]) -> None:
    """One reply per command, in order (RFC 959): the 230/530 comes before the reply
    to whatever was pipelined behind PASS, urgent commands included."""
    from ftpcluster.worker.session import User

    for user, first in ((User("alice", ""), 230), (None, 530)):
        d = make()
        out = d.s.receive_data(b"USER alice\r\nPASS s3cret-pw\r\nNOOP\r\nSTAT\r\nQUIT\r\n")
        assert [o.code for o in out if hasattr(o, "code")] == [331] and d.s.state is State.AUTH
        if user is not None:
            user = User("alice", str(d.home))
        after = [o.code for o in d.s.auth_done(user) if hasattr(o, "code")]
        assert after == [first, 200, 211, 221] and d.s.closed, after
        assert d.s.receive_data(b"NOOP\r\n") == []


def test_pasv_then_quit_answers_both_in_order(make: Callable[..., Driver]) -> None:
    d = make("alice")
    out = d.s.receive_data(b"PASV\r\nQUIT\r\n")
    assert [o.code for o in out if hasattr(o, "code")] == [221]
    assert [o.code for o in d.s.passive_ready("127.0.0.1", 50000, False) if hasattr(o, "code")] == [227]
    assert d.s.closed


def test_passive_failure_is_425_and_the_session_goes_on(make: Callable[..., Driver]) -> None:
    d = make("alice")
    d.passive_fails = "Can't open passive connection: none free"
    assert [r.code for r in d.feed(b"EPSV\r\nRETR f.txt\r\nNOOP\r\n")] == [425, 425, 200]
    assert not d.s.data_ready


def test_pipelined_commands_during_a_transfer_keep_their_order(drv: Driver) -> None:
    d = drv
    d.hold_transfers = True
    got = d.feed(b"EPSV\r\nRETR f.txt\r\nPWD\r\nSIZE f.txt\r\nNOOP\r\n")
    assert [r.code for r in got] == [229, 150]  # NOOP is urgent, but not ahead of PWD and SIZE
    assert [r.code for r in d.finish()] == [226, 257, 213, 200]
    # Sent once the transfer runs and nothing waits before it, NOOP is answered at once.
    assert [r.code for r in d.feed(b"EPSV\r\nRETR f.txt\r\n")] == [229, 150]
    assert [r.code for r in d.feed(b"NOOP\r\n")] == [200]
    assert [r.code for r in d.finish()] == [226]


def test_rein_and_user_during_a_transfer_answered_at_once(drv: Driver) -> None:
    d = drv
    d.hold_transfers = True
    assert [r.code for r in d.feed(b"EPSV\r\nRETR f.txt\r\n")] == [229, 150]
    assert [r.code for r in d.feed(b"REIN\r\n")] == [220]
    assert d.s.user is None and d.held is not None  # the transfer keeps its connection
    assert [r.code for r in d.feed(b"USER alice\r\n")] == [331]
    assert [r.code for r in d.finish()] == [226]
    assert d.code("PASS s3cret-pw") == 230


def test_urgent_commands_during_a_passive_open(drv: Driver) -> None:
    """Lines in one read with EPSV: the listener is still being opened when they are
    taken, so they queue and are answered in command order after the transfer."""
    d = drv
    d.hold_transfers = True
    assert [r.code for r in d.feed(b"EPSV\r\nRETR f.txt\r\nREIN\r\nABOR\r\n")] == [229, 150]
    assert [r.code for r in d.finish()] == [226, 220, 225]


def test_abor_queued_behind_retr_stops_it(drv: Driver) -> None:
    """EPSV, RETR, ABOR in one read: ABOR applies to the RETR (it was answered 225 before
    the transfer began, which then ran to its end)."""
    d = drv
    d.hold_transfers = True
    assert [r.code for r in d.feed(b"EPSV\r\nRETR f.txt\r\nABOR\r\n")] == [229, 150, 426, 226]
    assert d.s.state is State.READY


def test_rein_waits_when_a_command_is_queued(drv: Driver) -> None:
    d = drv
    d.hold_transfers = True
    assert [r.code for r in d.feed(b"EPSV\r\nRETR f.txt\r\nPWD\r\nREIN\r\n")] == [229, 150]
    assert [r.code for r in d.finish()] == [226, 257, 220]


def test_quit_during_a_transfer_waits_for_its_reply(drv: Driver) -> None:
    d = drv
    d.hold_transfers = True
    assert [r.code for r in d.feed(b"EPSV\r\nSTOR up.bin\r\n")] == [229, 150]
    assert d.feed(b"QUIT\r\nNOOP\r\n") == []
    assert d.s.quitting and not d.s.closed
    assert [r.code for r in d.finish()] == [226, 221]
    assert d.s.closed and (d.home / "up.bin").read_bytes() == b"data"


def test_abor_during_a_transfer(drv: Driver) -> None:
    d = drv
    d.hold_transfers = True
    assert [r.code for r in d.feed(b"EPSV\r\nRETR f.txt\r\n")] == [229, 150]
    assert [r.code for r in d.feed(b"ABOR\r\n")] == [426, 226]
    assert d.s.state is State.READY and not d.s.data_ready
    assert d.code("ABOR") == 225  # nothing to abort now


def test_stat_during_a_transfer(drv: Driver) -> None:
    d = drv
    d.hold_transfers = True
    d.feed(b"EPSV\r\nRETR f.txt\r\n")
    st = d.text("STAT")
    assert st.startswith("211") and "Transfer in progress: RETR /f.txt" in st
    assert d.code("STAT /") == 450
    assert d.finish()[0].code == 226


@pytest.mark.parametrize("status,code", [("aborted", 426), ("no_connection", 425), ("failed", 451), ("refused", 522)])
def test_transfer_failures(drv: Driver, status: str, code: int) -> None:
    d = drv
    d.hold_transfers = True
    d.feed(b"EPSV\r\nRETR f.txt\r\n")
    assert [r.code for r in d.finish(TransferResult(status))] == [code]  # type: ignore[arg-type]
    t = [e for e in d.events if e.name == "transfer"][-1]
    assert t.fields["status"] == status and t.fields["direction"] == "o"
    assert not d.s.data_ready  # the next transfer needs a new PASV/EPSV


def test_failure_code_from_the_io_layer(drv: Driver) -> None:
    d = drv
    d.hold_transfers = True
    d.feed(b"EPSV\r\nSTOR x\r\n")
    r = d.finish(TransferResult("failed", code=452, message="Insufficient storage space"))
    assert (r[0].code, r[0].text) == (452, "Insufficient storage space")


def test_backlog_stops_taking_lines(make: Callable[..., Driver]) -> None:
    """100 commands behind PASS: 32 are queued, the rest stay unsplit in the line buffer."""
    d = make()
    out = d.s.receive_data(b"USER alice\r\nPASS s3cret-pw\r\n" + b"PWD\r\n" * 100)
    assert d.s.backlogged and len(d.s._queue) == MAX_QUEUED_LINES
    assert d.s._lines.pending == (100 - MAX_QUEUED_LINES) * 5
    d.take(out)  # the driver answers the password check
    assert not d.s.backlogged
    assert [r.code for r in d.replies[1:]] == [331, 230] + [257] * 100


def test_passive_expired_needs_a_new_pasv(drv: Driver) -> None:
    d = drv
    assert d.code("PASV") == 227 and d.s.data_ready
    d.s.passive_expired()
    assert d.code("RETR f.txt") == 425


@pytest.mark.parametrize("what,event,text", [("login", "TimeoutLogin", "Login timeout"),
                                             ("idle", "TimeoutIdle", "Idle timeout"),
                                             ("no_transfer", "TimeoutNoTransfer", "No transfer timeout")])
def test_timeouts_say_why_then_close(drv: Driver, what: str, event: str, text: str) -> None:
    d = drv
    d.take(d.s.timed_out(what))
    assert d.replies[-1].code == 421 and str(d.replies[-1].text).startswith(text)
    assert event in d.event_names() and d.server_closed and d.s.closed
