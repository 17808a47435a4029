"""The session's one state machine, as a table (h11's `_state.py` is the model).

A session is READY to run commands, or waits for one asynchronous step the I/O
layer performs (a password check, a passive listener, a filesystem call run off
the event loop, a transfer, the TLS switch after AUTH), or is CLOSED. Every
change of state goes through `next_state` and the table below, so the allowed
orders are written down in one place and a wrong one is a bug that raises.

While a step is outstanding, lines are queued in order; only commands the table
calls urgent for that state (RFC 959's ABOR, STAT, NOOP, QUIT during a transfer)
run at once (`session._is_urgent`)."""

from __future__ import annotations

from enum import Enum


class State(Enum):
    READY = "ready"  # commands run as they arrive
    AUTH = "auth"  # a password check is out (VerifyPassword)
    PASSIVE = "passive"  # a passive listener is being opened (OpenPassive)
    FILESYSTEM = "filesystem"  # a blocking filesystem call runs off the loop (RunBlocking)
    TRANSFER = "transfer"  # the data connection moves a file or a listing (Transfer)
    TLS = "tls"  # 234 sent for AUTH TLS: nothing more is read until the handshake is done
    CLOSED = "closed"  # Close was sent: lines are no longer read

    # Members are singletons compared by identity: the C identity hash, not Enum's
    # Python-level hash of the name (a table lookup per step and per queued line).
    __hash__ = object.__hash__


class Step(Enum):
    CHECK_PASSWORD = "check_password"
    AUTH_DONE = "auth_done"
    OPEN_PASSIVE = "open_passive"
    PASSIVE_DONE = "passive_done"
    RUN_BLOCKING = "run_blocking"
    BLOCKING_DONE = "blocking_done"
    START_TRANSFER = "start_transfer"
    TRANSFER_DONE = "transfer_done"
    START_TLS = "start_tls"
    TLS_DONE = "tls_done"
    CLOSE = "close"

    __hash__ = object.__hash__  # as State's


class LocalProtocolError(Exception):
    """The core was driven in an order the table does not allow: a bug, never the client's."""


# The result of a step that was out when the session closed still arrives (QUIT is
# urgent, so "PASV; QUIT" closes before the listener is open): it is answered, so the
# replies keep their order, and the session stays closed.
_AFTER_CLOSE = {s: State.CLOSED for s in (Step.AUTH_DONE, Step.PASSIVE_DONE, Step.BLOCKING_DONE,
                                          Step.TRANSFER_DONE, Step.TLS_DONE, Step.CLOSE)}  # fmt: skip

TRANSITIONS: dict[State, dict[Step, State]] = {
    State.READY: {
        Step.CHECK_PASSWORD: State.AUTH,
        Step.OPEN_PASSIVE: State.PASSIVE,
        Step.RUN_BLOCKING: State.FILESYSTEM,
        Step.START_TRANSFER: State.TRANSFER,
        Step.START_TLS: State.TLS,
        Step.CLOSE: State.CLOSED,
    },
    State.AUTH: {Step.AUTH_DONE: State.READY, Step.CLOSE: State.CLOSED},
    State.PASSIVE: {Step.PASSIVE_DONE: State.READY, Step.CLOSE: State.CLOSED},
    State.FILESYSTEM: {Step.BLOCKING_DONE: State.READY, Step.CLOSE: State.CLOSED},
    State.TRANSFER: {Step.TRANSFER_DONE: State.READY, Step.CLOSE: State.CLOSED},
    State.TLS: {Step.TLS_DONE: State.READY, Step.CLOSE: State.CLOSED},
    State.CLOSED: _AFTER_CLOSE,
}

# States in which urgent commands still run; in FILESYSTEM everything waits in order
# (the step is short, and the answer to the command before must come first).
# During a password check (AUTH) nothing is urgent: its reply (230/530) must come
# before the next command's, so NOOP, STAT and QUIT wait behind it like the rest.
URGENT_STATES = frozenset({State.PASSIVE, State.TRANSFER})


def next_state(state: State, step: Step) -> State:
    try:
        return TRANSITIONS[state][step]
    except KeyError:
        raise LocalProtocolError(f"{step.value} is not allowed in state {state.value}") from None
