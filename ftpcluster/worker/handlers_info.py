"""Information and negotiation: SYST FEAT OPTS HELP STAT NOOP."""

from __future__ import annotations

import posixpath
from functools import partial
from typing import TYPE_CHECKING

from .commands import Arg, command
from .listing import MLST_FACTS
from .parse import split_list_arg
from .state import State

if TYPE_CHECKING:
    from .session import Session


@command("SYST", auth=False, help="SYST: system type")
def syst(s: Session, arg: str) -> None:
    s.reply(215, "UNIX Type: L8")


@command("NOOP", auth=False, urgent=True, help="NOOP: do nothing")
def noop(s: Session, arg: str) -> None:
    s.reply(200, "NOOP ok")


@command("FEAT", auth=False, help="FEAT: list extensions")
def feat(s: Session, arg: str) -> None:
    facts = "".join(f"{f}{'*' if f in s.mlst_facts else ''};" for f in MLST_FACTS)
    lines = ["Features:", "EPRT", "EPSV", "HOST", "MDTM", "MFMT", "MLST " + facts, "REST STREAM", "SIZE", "TVFS", "UTF8"]
    if s.settings.tls_available:
        lines[1:1] = ["AUTH TLS", "AUTH SSL", "PBSZ", "PROT"]
    lines.append("End")
    s.reply(211, lines)


@command("OPTS", arg=Arg.REQUIRED, auth=False, help="OPTS UTF8 ON | OPTS MLST facts")
def opts(s: Session, arg: str) -> None:
    name, _, value = arg.partition(" ")
    name = name.upper()
    if name == "UTF8":
        if value.upper() in ("ON", ""):
            s.utf8 = True
            s.reply(200, "UTF8 mode enabled")
        else:
            s.reply(504, "Only UTF8 ON is supported")
    elif name == "MLST":
        wanted = [f.lower() for f in value.split(";") if f]
        s.mlst_facts = [f for f in wanted if f in MLST_FACTS]
        s.reply(200, " ".join(["MLST OPTS", *(["".join(f + ";" for f in s.mlst_facts)] if s.mlst_facts else [])]))
    else:
        s.reply(501, f"OPTS {name} not understood")


@command("HELP", arg=Arg.OPTIONAL, auth=False, help="HELP [command]")
def help_(s: Session, arg: str) -> None:
    if arg:
        spec = s.commands.get(arg.upper())
        if spec is None:
            s.reply(502, f"Unknown command {arg.upper()}")
        else:
            s.reply(214, spec.help)
        return
    verbs = sorted(s.commands)
    rows = [" ".join(f"{v:<5}" for v in verbs[i : i + 10]) for i in range(0, len(verbs), 10)]
    s.reply(214, ["The following commands are recognized:", *rows, "Help OK"])


@command("STAT", arg=Arg.OPTIONAL, auth=False, urgent=True, help="STAT [path]: status or a listing")
def stat_(s: Session, arg: str) -> None:
    if not arg:
        lines = ["ftpcluster status:", f"Connected from {s.client_ip}", f"Session {s.session_id} (node-pid-serial)"]
        lines.append(f"Logged in as {s.user.name}" if s.user else "Not logged in")
        lines.append(f"TYPE: {'BINARY' if s.binary else 'ASCII'}; STRUcture: File; MODE: Stream")
        lines.append(f"Control channel: {'TLS' if s.tls_control else 'plain'}; data: {'private' if s.prot_private else 'clear'}")
        if s.transfer is not None:
            lines.append(f"Transfer in progress: {s.transfer.command} {s.transfer.virtual}")
        lines.append("End of status")
        s.reply(211, lines)
        return
    if s.user is None:
        s.reply(530, "Please log in with USER and PASS first")
        return
    if s.state is State.TRANSFER:
        s.reply(450, "A transfer is in progress")
        return
    r = s.resolve(split_list_arg(arg), must_exist=True)
    status = 212 if s.fs.is_dir(r.real) else 213  # RFC 959: directory / file status

    def answer(s: Session, chunks: list[bytes]) -> None:
        body: list[str] = []
        for chunk in chunks:
            body.extend(line for line in chunk.decode("utf-8", "surrogateescape").split("\r\n") if line)
            if len(body) > 10_000:
                break
        s.reply(status, [f"Status of {r.virtual}:", *body, "End of status"])

    call = partial(s.fs.listing, "LIST", r.real, posixpath.basename(r.virtual) or "/", [], True)
    if s.state is State.READY:
        s.run_blocking("STAT", call, answer)
    else:  # urgent, while a password check or a passive open is out: no second step
        answer(s, call())
