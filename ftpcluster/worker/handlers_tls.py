"""RFC 4217 negotiation: AUTH PBSZ PROT CCC. The TLS itself is the I/O layer's job."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .commands import Arg, command
from .numbers import is_ascii_number
from .protocol import EventName, StartTLS
from .state import Step

if TYPE_CHECKING:
    from .session import Session


@command("AUTH", arg=Arg.REQUIRED, auth=False, help="AUTH TLS: secure the control channel")
def auth(s: Session, arg: str) -> None:
    mech = arg.upper()
    if not s.settings.tls_available:
        s.reply(502, "TLS is not configured on this server")
        return
    if mech not in ("TLS", "SSL", "TLS-C", "TLS-P"):
        s.reply(504, f"AUTH {arg} not supported; use AUTH TLS")
        return
    if s.tls_control:
        s.reply(503, "TLS already active on the control channel")
        return
    if s.user is not None:
        s.reply(503, "AUTH must come before login")
        return
    s.emit(EventName.TLS_HANDSHAKE)
    s.reply(234, f"AUTH {mech} successful")
    s.act(StartTLS())
    s.step(Step.START_TLS)
    if mech in ("SSL", "TLS-P"):
        # Old clients' AUTH SSL implied protected data (draft-murray-auth-ftp-ssl).
        s.pbsz = True
        s.prot_private = True


@command("PBSZ", arg=Arg.REQUIRED, auth=False, help="PBSZ 0: required before PROT")
def pbsz(s: Session, arg: str) -> None:
    if not s.tls_control:
        s.reply(503, "PBSZ needs a TLS control channel: use AUTH TLS first")
        return
    if not is_ascii_number(arg):
        s.reply(501, "PBSZ needs a number")
        return
    s.pbsz = True
    s.reply(200, "PBSZ=0")


@command("PROT", arg=Arg.REQUIRED, auth=False, help="PROT P|C: protect data connections or not")
def prot(s: Session, arg: str) -> None:
    if not s.tls_control:
        s.reply(503, "PROT needs a TLS control channel: use AUTH TLS first")
        return
    if not s.pbsz:
        s.reply(503, "PBSZ must come before PROT")
        return
    level = arg.upper()
    if level == "P":
        s.prot_private = True
        s.reply(200, "Protection level set to Private")
    elif level == "C":
        s.prot_private = False
        s.reply(200, "Protection level set to Clear")
    elif level in ("S", "E"):
        s.reply(536, "Only PROT P and PROT C are supported")
    else:
        s.reply(504, "PROT level not understood")


@command("CCC", auth=False, help="CCC: refused; the control channel stays encrypted")
def ccc(s: Session, arg: str) -> None:
    s.reply(534, "CCC refused: the control channel stays protected")
