"""Login and session lifetime: USER PASS ACCT REIN QUIT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .account import User
from .commands import Arg, command
from .listing import MLST_FACTS
from .protocol import ClosePassive, EventName, VerifyPassword
from .state import State, Step

if TYPE_CHECKING:
    from .session import Session

ANONYMOUS_NAMES = frozenset({"anonymous", "ftp"})


def _control_tls_missing(s: Session) -> bool:
    return s.settings.tls_required in ("control", "both") and not s.tls_control


@command("USER", arg=Arg.REQUIRED, auth=False, in_transfer=True, help="USER <name>: start a login")
def user(s: Session, arg: str) -> None:
    if _control_tls_missing(s):
        s.reply(530, "TLS required on the control channel: use AUTH TLS first")
        return
    if s.user is not None:
        # RFC 959 allows a new USER to start over; transfer parameters (TYPE, PORT/PASV) stay.
        s.reset_login()
    s.pending_user = arg
    s.emit(EventName.USER, user=arg)
    if arg.lower() in ANONYMOUS_NAMES and s.settings.anonymous_root:
        s.reply(331, "Anonymous login ok, send your e-mail address as password")
    else:
        s.reply(331, f"Password required for {arg}")


@command("PASS", arg=Arg.OPTIONAL, auth=False, help="PASS <password>: finish a login")
def password(s: Session, arg: str) -> None:
    if _control_tls_missing(s):
        s.reply(530, "TLS required on the control channel: use AUTH TLS first")
        return
    if s.user is not None:
        s.reply(503, "Already logged in")
        return
    if s.pending_user is None:
        s.reply(503, "Login with USER first")
        return
    name = s.pending_user
    gate = s.settings.user_gate
    refusal = gate(name, s.client_ip) if gate is not None else None
    if refusal is not None:
        s.pending_user = None
        s.emit(EventName.LOGIN_REFUSED, user=name, reason=refusal)
        s.reply(530, refusal)
        return
    if name.lower() in ANONYMOUS_NAMES and s.settings.anonymous_root:
        finish_login(s, User("anonymous", s.settings.anonymous_root, read_only=True, anonymous=True))
        return
    if not arg:
        s.emit(EventName.EMPTY_PASSWORD, user=name)
    if name == "root":
        s.emit(EventName.ROOT_LOGIN, user=name)
    s.step(Step.CHECK_PASSWORD)
    s.act(VerifyPassword(name, arg))


def finish_login(s: Session, user: User | None) -> None:
    name = s.pending_user or ""
    if user is None:
        s.login_failures += 1
        s.pending_user = None
        s.emit(EventName.LOGIN_FAILED, user=name, attempt=s.login_failures)
        if s.login_failures >= s.settings.max_login_attempts:
            s.emit(EventName.MAX_LOGIN_ATTEMPTS, user=name)
            s.emit(EventName.MAX_LOGIN_ATTEMPTS_FROM_USER, user=name)
            s.close(530, "Login incorrect; too many attempts, closing connection")
        else:
            s.reply(530, "Login incorrect")
        return
    s.user = user
    s.open_home(user.home)
    s.pending_user = None
    s.emit(EventName.LOGIN, user=user.name, anonymous=user.anonymous)
    s.reply(230, f"User {user.name} logged in" + (", read-only access" if user.read_only else ""))


@command("HOST", arg=Arg.REQUIRED, auth=False, help="HOST <name>: virtual host (RFC 7151), before USER")
def host(s: Session, arg: str) -> None:
    if s.user is not None or s.pending_user is not None:
        s.reply(503, "HOST must come before USER")
        return
    # One tree per user, no virtual hosts: every name reaches the same (default) host.
    s.reply(220, f"Host {arg} accepted")


@command("ACCT", arg=Arg.REQUIRED, auth=False, help="ACCT: not needed here")
def acct(s: Session, arg: str) -> None:
    s.reply(202, "ACCT not needed")


@command("REIN", auth=False, in_transfer=True, help="REIN: log out and start over")
def rein(s: Session, arg: str) -> None:
    s.reset_login()
    # "All parameters reset to the defaults" (RFC 959); TLS on the control channel stays.
    s.binary = True
    s.epsv_all = False
    s.mlst_facts = list(MLST_FACTS)
    if s.state is not State.TRANSFER:  # a running transfer keeps its data connection and completes
        s.data_ready = False
        s.act(ClosePassive())
    s.reply(220, "Service ready for new user")


@command("QUIT", auth=False, urgent=True, help="QUIT: end the session")
def quit_(s: Session, arg: str) -> None:
    if s.state is State.TRANSFER:
        # RFC 959 section 4.1.1: the transfer completes and its reply comes first;
        # finish_transfer then says 221 and closes.
        s.quitting = True
        return
    s.close(221, "Goodbye")
