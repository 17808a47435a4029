"""A stock FTP/FTPS client as most users run one: Python's ftplib, Nagle's algorithm
left on. `nodelay=True` gives the same client with TCP_NODELAY on every socket, the
reference a stall is measured against (delayed-ACK stalls hit only Nagle clients).

Beyond what ftplib ships: it offers a saved TLS session on the control connection
(resumed login), reuses the control session on data connections (what servers that
require session reuse need), and speaks implicit TLS. None of that changes how the
client writes to its sockets."""

from __future__ import annotations

import ftplib
import io
import socket
import ssl
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


def client_context(maxv: ssl.TLSVersion | None = None, tickets: bool = True) -> ssl.SSLContext:
    """Unverified (self-signed loopback peers); `tickets=False` makes TLS 1.2 resume
    through the server's session-id cache instead of a ticket."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if maxv is not None:
        ctx.minimum_version = ctx.maximum_version = maxv
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


class StockFTP(ftplib.FTP_TLS):
    """ftplib.FTP_TLS; plain FTP as long as auth() is not called."""

    def __init__(self, nodelay: bool = False, context: ssl.SSLContext | None = None, offer: Any = None,
                 implicit: bool = False, timeout: float = 10) -> None:  # fmt: skip
        super().__init__(context=context or client_context(), timeout=timeout)
        self.nodelay, self.offer, self.implicit = nodelay, offer, implicit

    def _tune(self, sock: socket.socket) -> None:
        if self.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connect(self, host: str = "", port: int = 0, timeout: float = -999, source_address: Any = None) -> str:  # type: ignore[override]
        if not self.implicit:
            self.sock = socket.create_connection((host, port), self.timeout)
            self._tune(self.sock)
            self.host, self.port, self.af = host, port, self.sock.family
            self.file = self.sock.makefile("r", encoding=self.encoding)
            self.welcome = self.getresp()
            return self.welcome
        raw = socket.create_connection((host, port), self.timeout)
        self._tune(raw)
        self.host, self.port, self.af = host, port, raw.family
        self.sock = self.context.wrap_socket(raw, server_hostname=host, session=self.offer)
        self.file = self.sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        return self.welcome

    def auth(self) -> str:
        """FTP_TLS.auth, offering `self.offer` (a session saved from an earlier login)."""
        resp = self.voidcmd("AUTH TLS")
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host, session=self.offer)
        self.file = self.sock.makefile("r", encoding=self.encoding)
        return resp

    def ntransfercmd(self, cmd: str, rest: Any = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        self._tune(conn)  # nothing was written on it yet
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size

    @property
    def session(self) -> Any:
        return self.sock.session if isinstance(self.sock, ssl.SSLSocket) else None

    @property
    def resumed(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.session_reused


def login(host: str, port: int, user: str, password: str, *, nodelay: bool = False, tls: bool = True,
          context: ssl.SSLContext | None = None, offer: Any = None, implicit: bool = False,
          timeout: float = 10) -> tuple[StockFTP, float]:  # fmt: skip
    """A logged-in client and the seconds from connect to the 230 reply."""
    f = StockFTP(nodelay, context, offer, implicit, timeout)
    t0 = time.perf_counter()
    try:
        f.connect(host, port)
        if tls and not implicit:
            f.auth()
        f.sendcmd(f"USER {user}")
        f.voidcmd(f"PASS {password}")
    except BaseException:
        f.close()
        raise
    return f, time.perf_counter() - t0


def quit(f: StockFTP) -> None:
    try:
        f.quit()
    except (OSError, EOFError, ftplib.Error):
        f.close()


def timed(op: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    op(*args)
    return time.perf_counter() - t0


# One transfer each, as ftplib does them (PASV or EPSV, the command, data, 226).
def stor(f: StockFTP, name: str, data: bytes, cmd: str = "STOR") -> None:
    f.storbinary(f"{cmd} {name}".strip(), io.BytesIO(data))


def retr(f: StockFTP, name: str, rest: int | None = None) -> bytes:
    out: list[bytes] = []
    f.retrbinary(f"RETR {name}", out.append, rest=rest)
    return b"".join(out)


def listing(f: StockFTP) -> list[str]:
    lines: list[str] = []
    f.retrlines("LIST", lines.append)
    return lines


# ------------------------------------------------------------------ stall cases
V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
KB = b"x" * 1024
# STOR/APPE/STOU: the client writes first on the data connection; RETR/LIST: we do.
TRANSFERS = ("STOR 1 KB", "APPE 1 KB", "STOU 1 KB", "RETR 1 KB", "REST+RETR", "LIST", "EPSV+RETR")


@dataclass
class Target:
    """Where the cases run. `cache_port`: a server of the same kind with TLS tickets
    off (resumption through its session-id cache, TLS 1.3 stateful tickets)."""

    host: str
    port: int
    user: str
    password: str
    implicit_port: int | None = None
    cache_port: int | None = None
    resumed: dict[str, list[bool]] = field(default_factory=dict)  # case -> did each login resume


Case = Callable[[bool], float]  # nodelay -> seconds of one operation


def login_case(t: Target, name: str, maxv: ssl.TLSVersion, *, resume: bool, implicit: bool = False,
               cache: bool = False) -> Case:  # fmt: skip
    """One login (connect to 230) per call; with `resume`, each client variant offers
    the session its previous login ended with (a TLS 1.3 ticket is used once)."""
    port = t.implicit_port if implicit else (t.cache_port if cache and t.cache_port else t.port)
    assert port is not None
    ctx = {False: client_context(maxv, tickets=not cache), True: client_context(maxv, tickets=not cache)}
    saved: dict[bool, Any] = {}

    def run(nodelay: bool) -> float:
        f, secs = login(t.host, port, t.user, t.password, nodelay=nodelay, context=ctx[nodelay],
                        offer=saved.get(nodelay) if resume else None, implicit=implicit)  # fmt: skip
        if resume and nodelay in saved:
            t.resumed.setdefault(name, []).append(f.resumed)
        saved[nodelay] = f.session
        quit(f)
        return secs

    if resume:  # a first login per variant to have something to offer
        run(False), run(True)
    return run


def transfer_cases(t: Target, prefix: str, maxv: ssl.TLSVersion | None) -> tuple[dict[str, Case], Callable[[], None]]:
    """Transfers on one logged-in session per client variant (PROT P when `maxv`,
    plain otherwise); returns the cases and a function that logs both out."""
    sessions = {}
    for nodelay in (False, True):
        f, _ = login(t.host, t.port, t.user, t.password, nodelay=nodelay, tls=maxv is not None,
                     context=client_context(maxv) if maxv else None)  # fmt: skip
        if maxv is not None:
            f.prot_p()
        f.voidcmd("TYPE I")
        stor(f, f"seed-{nodelay:d}.bin", KB)
        sessions[nodelay] = f

    def epsv(nodelay: bool) -> None:
        f = sessions[nodelay]
        af, f.af = f.af, socket.AF_INET6  # ftplib sends EPSV (229) to IPv6 servers only
        try:
            retr(f, f"seed-{nodelay:d}.bin")
        finally:
            f.af = af

    ops: dict[str, Callable[[bool], Any]] = {  # the keys are TRANSFERS
        "STOR 1 KB": lambda nd: stor(sessions[nd], f"up-{nd:d}.bin", KB),
        "APPE 1 KB": lambda nd: stor(sessions[nd], f"app-{nd:d}.bin", KB, "APPE"),
        "STOU 1 KB": lambda nd: stor(sessions[nd], "", KB, "STOU"),
        "RETR 1 KB": lambda nd: retr(sessions[nd], f"seed-{nd:d}.bin"),
        "REST+RETR": lambda nd: retr(sessions[nd], f"seed-{nd:d}.bin", rest=512),
        "LIST": lambda nd: listing(sessions[nd]),
        "EPSV+RETR": epsv,
    }
    cases = {f"{prefix} {k}": (lambda op: lambda nd: timed(op, nd))(op) for k, op in ops.items()}

    def close() -> None:
        for f in sessions.values():
            quit(f)

    return cases, close


def case_names(implicit: bool, cache: bool) -> list[str]:
    """The cases `build_cases` makes for a target with an implicit-TLS listener and/or
    a tickets-off server (known before any server runs: test ids)."""
    names = []
    for vn in ("1.2", "1.3"):
        names += [f"login explicit TLS {vn} full", f"login explicit TLS {vn} resumed ticket"]
        if cache or vn == "1.2":  # TLS 1.2 can ask any server for its session-id cache
            names.append(f"login explicit TLS {vn} resumed cache")
        if implicit:
            names += [f"login implicit TLS {vn} full", f"login implicit TLS {vn} resumed"]
    for prefix in ("PROT P TLS 1.2", "PROT P TLS 1.3", "plain"):
        names += [f"{prefix} {op}" for op in TRANSFERS]
    return names


def build_cases(t: Target) -> tuple[dict[str, Case], Callable[[], None]]:
    """Every case of `case_names` for `t`, and a function ending the sessions they hold."""
    implicit, cache = t.implicit_port is not None, t.cache_port is not None
    cases: dict[str, Case] = {}
    closers = []
    for v, vn in ((V12, "1.2"), (V13, "1.3")):
        for name in case_names(implicit, cache):
            if not name.startswith("login") or f"TLS {vn}" not in name:
                continue
            cases[name] = login_case(t, name, v, resume="resumed" in name, implicit="implicit" in name,
                                     cache="cache" in name)  # fmt: skip
    for v, prefix in ((V12, "PROT P TLS 1.2"), (V13, "PROT P TLS 1.3"), (None, "plain")):
        more, close = transfer_cases(t, prefix, v)
        cases.update(more)
        closers.append(close)

    def close_all() -> None:
        for close in closers:
            close()

    return {n: cases[n] for n in case_names(implicit, cache)}, close_all


def measure(cases: dict[str, Case], n: int) -> dict[str, tuple[float, float]]:
    """name -> (stock median, nodelay median) seconds, the two interleaved."""
    out = {}
    for name, case in cases.items():
        got: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(n):
            for nodelay in (False, True):
                got[nodelay].append(case(nodelay))
        out[name] = (statistics.median(got[False]), statistics.median(got[True]))
    return out


# ------------------------------------------------------------------ split handshake
# GnuTLS (lftp) writes the last flight of a TLS 1.3 handshake as two writes, its
# ChangeCipherSpec (6 bytes), then its Finished; with Nagle on, the Finished waits
# for our ACK of the CCS, in the middle of the handshake.
CCS = 20  # TLS record type change_cipher_spec


def split_handshake(sock: socket.socket, ctx: ssl.SSLContext, split: bool, session: Any = None) -> float:
    """A client handshake over `sock` (Nagle left on) through memory BIOs; with `split`
    the last flight's ChangeCipherSpec record and the rest go out as two writes, as
    GnuTLS writes them. Returns the seconds from that last write to the server's next
    bytes (a ticket, the banner, file data), which are peeked, not read."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sock.getpeername()[0], session=session)
    for _ in range(16):  # flights of one handshake: 2 or 3
        try:
            obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        data = out.read()
        if done and split and data[:1] == bytes([CCS]):
            sock.sendall(data[:6])
            sock.sendall(data[6:])
        elif data:
            sock.sendall(data)
        if done:
            t0 = time.perf_counter()
            sock.recv(1, socket.MSG_PEEK)
            return time.perf_counter() - t0
        got = sock.recv(65536)
        if not got:
            raise ConnectionError("server closed during the handshake")
        inc.write(got)
    raise RuntimeError("handshake did not finish in 16 flights")


def _reply(sock: socket.socket) -> bytes:
    """One single-line reply off a plain socket, before TLS."""
    buf = b""
    for _ in range(64):
        if buf.endswith(b"\r\n"):
            return buf
        got = sock.recv(1024)
        if not got:
            break
        buf += got
    raise ConnectionError(f"no reply line: {buf!r}")


def split_cases(t: Target) -> tuple[dict[str, Case], Callable[[], None]]:
    """Full TLS 1.3 handshakes (explicit and implicit login) and PROT P RETRs (resumed)
    by a client that writes its CCS and Finished apart; the flag, as nodelay does for
    the stock cases, picks the reference: the same client writing them at once. Each
    call returns the seconds from the client's last handshake write to our next bytes."""
    f, _ = login(t.host, t.port, t.user, t.password, context=client_context(V13))
    f.prot_p()
    f.voidcmd("TYPE I")
    stor(f, "split-seed.bin", KB)

    def explicit(one_write: bool) -> float:
        with socket.create_connection((t.host, t.port), 10) as s:
            _reply(s)
            s.sendall(b"AUTH TLS\r\n")
            _reply(s)
            return split_handshake(s, client_context(V13), not one_write)

    def implicit(one_write: bool) -> float:
        assert t.implicit_port is not None
        with socket.create_connection((t.host, t.implicit_port), 10) as s:
            return split_handshake(s, client_context(V13), not one_write)

    def retr(one_write: bool) -> float:
        with socket.create_connection(f.makepasv(), 10) as d:
            f.putcmd("RETR split-seed.bin")
            secs = split_handshake(d, f.context, not one_write, session=f.sock.session)
            for _ in range(64):  # the encrypted file and close_notify, then the server closes
                if not d.recv(65536):
                    break
        f.getresp()  # 150
        f.voidresp()  # 226
        return secs

    cases: dict[str, Case] = {"split CCS|Finished explicit login": explicit, "split CCS|Finished PROT P RETR": retr}
    if t.implicit_port is not None:
        cases["split CCS|Finished implicit login"] = implicit
    return cases, lambda: quit(f)
