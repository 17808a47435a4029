"""Data transfers and their set-up: TYPE MODE STRU PASV EPSV PORT EPRT REST ALLO
RETR STOR STOU APPE LIST NLST MLSD ABOR."""

from __future__ import annotations

import ipaddress
import os
import posixpath
import stat
from functools import partial
from typing import TYPE_CHECKING

from .commands import Arg, command
from .fs import PathError, Resolved, temp_upload_name
from .numbers import ascii_int, is_ascii_number
from .parse import split_list_arg
from .protocol import AbortTransfer, ClosePassive, EventName, OpenPassive, SetActive, Transfer, TransferResult
from .state import State, Step

if TYPE_CHECKING:
    from .session import Session


# ------------------------------------------------------------------ parameters
@command("TYPE", arg=Arg.REQUIRED, help="TYPE A|I: ASCII or binary")
def type_(s: Session, arg: str) -> None:
    t = arg.upper().split()
    if t in (["I"], ["L", "8"]):
        s.binary = True
        s.reply(200, "Type set to I")
    elif t in (["A"], ["A", "N"]):
        s.binary = False
        s.reply(200, "Type set to A")
    else:
        s.reply(504, f"TYPE {arg} not supported")


@command("MODE", arg=Arg.REQUIRED, auth=False, help="MODE S: stream mode only")
def mode(s: Session, arg: str) -> None:
    if arg.upper() == "S":
        s.reply(200, "Mode set to S")
    else:
        s.reply(504, "Only MODE S is supported")


@command("STRU", arg=Arg.REQUIRED, auth=False, help="STRU F: file structure only")
def stru(s: Session, arg: str) -> None:
    if arg.upper() == "F":
        s.reply(200, "Structure set to F")
    else:
        s.reply(504, "Only STRU F is supported")


@command("REST", arg=Arg.REQUIRED, help="REST <offset>: resume the next RETR or STOR there")
def rest(s: Session, arg: str) -> None:
    offset = ascii_int(arg)
    if offset is None:
        s.reply(501, "REST needs a non-negative byte offset")
        return
    s.rest = offset
    s.reply(350, f"Restarting at {s.rest}; send RETR or STOR")


@command("ALLO", arg=Arg.OPTIONAL, help="ALLO <size>: the size of the next upload (checked against quotas)")
def allo(s: Session, arg: str) -> None:
    s.allo = ascii_int(arg.split(" ")[0]) or 0
    s.reply(202, "ALLO noted; no space needs reserving")


# ------------------------------------------------------------------ data connection set-up
def _new_data_channel(s: Session) -> None:
    if s.data_ready:
        s.act(ClosePassive())
        s.data_ready = False


@command("PASV", help="PASV: passive mode (IPv4)")
def pasv(s: Session, arg: str) -> None:
    if s.epsv_all:
        s.reply(503, "Only EPSV is allowed after EPSV ALL")
        return
    if ":" in s.client_ip and not s.client_ip.startswith("::ffff:"):
        s.reply(425, "PASV is for IPv4; use EPSV")
        return
    _new_data_channel(s)
    s.step(Step.OPEN_PASSIVE)
    s.act(OpenPassive(extended=False))


@command("EPSV", arg=Arg.OPTIONAL, help="EPSV [ALL|1|2]: extended passive mode")
def epsv(s: Session, arg: str) -> None:
    a = arg.upper()
    if a == "ALL":
        s.epsv_all = True
        s.reply(200, "EPSV ALL accepted")
        return
    if a and not is_ascii_number(a):
        s.reply(501, "Syntax: EPSV [ALL|<net-prt>]")
        return
    if a not in ("", _net_prt(s)):
        # RFC 2428 section 3: a protocol other than the control connection's is refused
        # with 522 and the list of those we would accept (EPSV 2 on IPv4 included).
        s.reply(522, f"Network protocol not supported, use ({_net_prt(s)})")
        return
    _new_data_channel(s)
    s.step(Step.OPEN_PASSIVE)
    s.act(OpenPassive(extended=True))


def _net_prt(s: Session) -> str:
    """RFC 2428 net-prt of the control connection: "1" IPv4 (mapped too), "2" IPv6."""
    ip = s.client_ip
    return "2" if ":" in ip and not ip.lower().startswith("::ffff:") else "1"


def _check_active_target(s: Session, host: str, port: int) -> bool:
    """No FTP bounce: only the control connection's own address, and not a privileged port."""
    if s.epsv_all:
        s.reply(503, "Only EPSV is allowed after EPSV ALL")
        return False
    try:
        target = ipaddress.ip_address(host)
        client = ipaddress.ip_address(s.client_ip)
    except ValueError:
        s.reply(501, "Bad address")
        return False
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped
    if target != client:
        s.reply(504, "Active mode only to your own address (no FTP bounce)")
        return False
    if port < 1024:
        s.reply(504, "Active mode only to ports 1024 and above")
        return False
    return True


@command("PORT", arg=Arg.REQUIRED, help="PORT h1,h2,h3,h4,p1,p2: active mode")
def port(s: Session, arg: str) -> None:
    nums = [ascii_int(p.strip(), 3) for p in arg.split(",")]
    if len(nums) != 6 or not all(n is not None and n <= 255 for n in nums):
        s.reply(501, "Syntax: PORT h1,h2,h3,h4,p1,p2")
        return
    host = ".".join(str(n) for n in nums[:4])
    port_no = nums[4] * 256 + nums[5]
    if _check_active_target(s, host, port_no):
        _new_data_channel(s)
        s.act(SetActive(host, port_no))
        s.data_ready = True
        s.reply(200, "PORT command successful")


@command("EPRT", arg=Arg.REQUIRED, help="EPRT |proto|address|port|: extended active mode")
def eprt(s: Session, arg: str) -> None:
    if len(arg) < 7 or arg[0] in "0123456789":
        s.reply(501, "Syntax: EPRT |proto|address|port|")
        return
    d = arg[0]
    fields = arg.split(d)
    port_no = ascii_int(fields[3], 5) if len(fields) == 5 else None
    if len(fields) != 5 or fields[0] or fields[4] or not fields[1] or port_no is None:
        s.reply(501, "Syntax: EPRT |proto|address|port|")
        return
    if fields[1] != _net_prt(s):
        s.reply(522, f"Network protocol not supported, use ({_net_prt(s)})")
        return
    if not 0 < port_no <= 65535:
        s.reply(501, "Bad port")
        return
    if _check_active_target(s, fields[2], port_no):
        _new_data_channel(s)
        s.act(SetActive(fields[2], port_no))
        s.data_ready = True
        s.reply(200, "EPRT command successful")


# ------------------------------------------------------------------ transfers
def _refusal(s: Session) -> tuple[int, str] | None:
    """Why no transfer can start now, whatever it would move."""
    if s.settings.tls_required in ("data", "both") and not s.prot_private:
        return 521, "Data connections must be protected: use PBSZ 0 and PROT P"
    if not s.data_ready:
        return 425, "Use PASV, EPSV, PORT or EPRT first"
    return None


def _start(s: Session, transfer: Transfer, what: str) -> None:
    """Common checks, then 150 and the Transfer action."""
    refusal = _refusal(s)
    if refusal is not None:
        s.reply(*refusal)
        return
    if s.settings.limits is not None:
        refusal = s.settings.limits.check(s, transfer)  # quotas, max upload size; sets transfer.wrap
        if refusal is not None:
            s.reply(*refusal)
            return
    transfer.protected = s.prot_private
    s.transfer = transfer
    s.step(Step.START_TRANSFER)
    s.abort_requested = False
    s.reply(150, what)
    s.act(transfer)


def _type_name(s: Session) -> str:
    return "BINARY" if s.binary else "ASCII"


@command("RETR", arg=Arg.REQUIRED, help="RETR <file>: download")
def retr(s: Session, arg: str) -> None:
    offset, s.rest = s.rest, 0
    r = s.resolve(arg, must_exist=True)
    st = r.st if r.st is not None else s.fs.stat(r.real)
    if not stat.S_ISREG(st.st_mode):
        raise PathError("Not a regular file")
    if not s.fs.can(r.real, os.R_OK):
        raise PathError("Permission denied")
    if offset and not s.binary:
        s.reply(554, "Resuming in ASCII mode is not supported; use TYPE I")
        return
    if offset > st.st_size:
        s.reply(554, "REST offset beyond the end of the file")
        return
    t = Transfer("send_file", path=r.real, offset=offset, ascii=not s.binary, virtual=r.virtual, command="RETR")
    _start(s, t, f"Opening {_type_name(s)} mode data connection for {r.virtual} ({st.st_size} bytes)")


def _store(s: Session, arg: str, append: bool, unique: bool) -> None:
    offset, s.rest = s.rest, 0
    if offset and not s.binary:
        s.reply(554, "Resuming in ASCII mode is not supported; use TYPE I")
        return
    if offset and unique:
        s.reply(554, "REST offset beyond the end of the file: STOU makes a new, empty file")
        return
    if unique:
        # Searching a free name can take up to a thousand lookups: off the loop.
        base = s.resolve(arg or "ftp.upload")
        s.run_blocking("STOU", partial(s.fs.unique_name, base.real), _store_unique)
        return
    _store_at(s, s.resolve(arg), append, False, offset)


def _store_unique(s: Session, name: str | None) -> None:
    if name is None:
        s.reply(553, "Could not find a unique name")
        return
    _store_at(s, s.resolve(s.fs.to_virtual(name)), False, True, 0)


def _store_at(s: Session, r: Resolved, append: bool, unique: bool, offset: int) -> None:
    if r.virtual == "/" or s.fs.is_dir(r.real):
        raise PathError("Is a directory")
    parent = os.path.dirname(r.real)
    if not s.fs.is_dir(parent):
        s.reply(553, "No such directory")
        return
    in_place = append or offset > 0 or unique or not s.settings.atomic_uploads
    try:
        st: Any = s.fs.stat(r.real)
    except OSError:
        st = None  # a new file
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise PathError("Not a regular file")  # a FIFO would block the writer's open
    if offset and offset > (st.st_size if st is not None else 0):
        # A missing file is empty: any offset is past its end (no zero-filled hole).
        s.reply(554, "REST offset beyond the end of the file")
        return
    temp = "" if in_place else os.path.join(parent, temp_upload_name())
    cmd = "APPE" if append else "STOU" if unique else "STOR"
    t = Transfer(
        "receive_file",
        path=r.real,
        offset=offset,
        ascii=not s.binary,
        temp_path=temp,
        append=append,
        exclusive=unique,
        virtual=r.virtual,
        command=cmd,
    )
    # RFC 1123 4.1.2.9: "FILE: pppp" names the file made; relative to the cwd when it is there.
    made = os.path.basename(r.virtual) if os.path.dirname(r.virtual) == s.cwd else r.virtual
    text = f"FILE: {made}" if unique else f"Opening {_type_name(s)} mode data connection for {r.virtual}"
    _start(s, t, text)


@command("STOR", arg=Arg.REQUIRED, help="STOR <file>: upload", write=True)
def stor(s: Session, arg: str) -> None:
    _store(s, arg, append=False, unique=False)


@command("APPE", arg=Arg.REQUIRED, help="APPE <file>: append", write=True)
def appe(s: Session, arg: str) -> None:
    _store(s, arg, append=True, unique=False)


@command("STOU", arg=Arg.OPTIONAL, help="STOU: upload under a unique name", write=True)
def stou(s: Session, arg: str) -> None:
    _store(s, arg, append=False, unique=True)


def _listing(s: Session, arg: str, kind: str) -> None:
    r = s.resolve(split_list_arg(arg) or ".", must_exist=True)
    name = posixpath.basename(r.virtual) or "/"
    writable = not (s.user and s.user.read_only)
    if kind == "MLSD" and not s.fs.is_dir(r.real):
        s.reply(501, "MLSD needs a directory")
        return
    if kind == "LIST" and s.fs.is_dir(r.real) and not s.fs.can(r.real, os.R_OK | os.X_OK):
        raise PathError("Permission denied")
    refusal = _refusal(s)
    if refusal is not None:  # no data connection: do not read the directory for nothing
        s.reply(*refusal)
        return

    def send(s: Session, chunks: list[bytes]) -> None:
        t = Transfer("send_lines", lines=iter(chunks), ascii=True, virtual=r.virtual, command=kind)
        _start(s, t, f"Here comes the listing of {r.virtual}")

    # A listing is a scandir, a stat per entry and a sort: built off the loop, then sent.
    s.run_blocking(kind, partial(s.fs.listing, kind, r.real, name, list(s.mlst_facts), writable), send)


@command("LIST", arg=Arg.OPTIONAL, help="LIST [path]: long listing")
def list_(s: Session, arg: str) -> None:
    _listing(s, arg, "LIST")


@command("NLST", arg=Arg.OPTIONAL, help="NLST [path]: names only")
def nlst(s: Session, arg: str) -> None:
    _listing(s, arg, "NLST")


@command("MLSD", arg=Arg.OPTIONAL, help="MLSD [dir]: machine-readable listing")
def mlsd(s: Session, arg: str) -> None:
    _listing(s, arg, "MLSD")


@command("ABOR", auth=False, urgent=True, help="ABOR: stop the running transfer")
def abor(s: Session, arg: str) -> None:
    if s.state is State.TRANSFER:
        s.abort_requested = True
        s.act(AbortTransfer())
        return  # replies come with transfer_done(aborted)
    if s.data_ready:
        s.act(ClosePassive())
        s.data_ready = False
    s.reply(225, "No transfer to abort")


def finish_transfer(s: Session, result: TransferResult) -> None:
    t, s.transfer = s.transfer, None
    s.data_ready = False
    code, text = _transfer_reply(result)
    if t is not None:
        fields = {} if code == 226 else {"reason": f"{code} {text}"}  # why, in the log line of a failed one
        s.emit(
            EventName.TRANSFER,
            command=t.command,
            path=t.virtual,
            bytes=result.bytes,
            status=result.status,
            seconds=result.seconds,
            ascii=t.ascii,
            direction="i" if t.kind == "receive_file" else "o",
            **fields,
        )
    s.reply(code, text)
    if result.status == "aborted" and s.abort_requested:
        s.reply(226, "ABOR command successful")
    s.abort_requested = False
    if s.quitting:
        s.close(221, "Goodbye")


def _transfer_reply(result: TransferResult) -> tuple[int, str]:
    if result.status == "ok":
        return 226, "Transfer complete"
    if result.status == "aborted":
        return 426, "Connection closed; transfer aborted"
    if result.status == "no_connection":
        return 425, result.message or "Can't open data connection"
    if result.status == "refused":
        return result.code or 522, result.message or "Data connection refused"
    return result.code or 451, result.message or "Transfer failed"
