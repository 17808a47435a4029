"""The reply codes of docs/conformance.md, command by command, against the session
core: one fresh session per table row over a home holding f.txt (3 bytes), TLS
available, alice's password checked by the driver. Each row is (id, logged in?,
[(command line, expected code, text the reply must contain)]); the doc names rows
as tests/session/test_conformance.py::test_exchange[<id>]. The end-to-end checks
that a real server gives the same answers are in tests/test_conformance.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftpcluster.worker.session import SessionSettings

from .driver import Driver

Step = tuple[str, int, str]

ROWS: list[tuple[str, bool, list[Step]]] = [
    # ---- RFC 959 access control
    ("user-pass", False, [("PASS x", 503, ""), ("USER alice", 331, ""), ("PASS wrong", 530, ""), ("PASS x", 503, "")]),
    ("user-again-starts-over", True, [("TYPE A", 200, ""), ("USER alice", 331, ""), ("PWD", 530, ""),
                                      ("PASS s3cret-pw", 230, ""), ("SIZE f.txt", 550, "ASCII")]),  # TYPE stays
    ("acct", True, [("ACCT x", 202, ""), ("ACCT", 501, "")]),
    ("cwd-cdup", True, [("MKD d", 257, '"/d"'), ("CWD d", 250, ""), ("CDUP", 250, ""), ("CDUP", 250, ""),
                        ("CWD nope", 550, ""), ("CWD", 501, "")]),  # fmt: skip
    ("smnt", True, [("SMNT /mnt", 502, "")]),
    ("rein", True, [("EPSV ALL", 200, ""), ("OPTS MLST size;", 200, ""), ("TYPE A", 200, ""), ("REST 1", 350, ""),
                    ("RNFR f.txt", 350, ""), ("REIN", 220, ""), ("PWD", 530, ""), ("USER alice", 331, ""),
                    ("PASS s3cret-pw", 230, ""), ("PASV", 227, ""), ("MLST f.txt", 250, "modify="),
                    ("SIZE f.txt", 213, "213 3"), ("RNTO g.txt", 503, "")]),  # fmt: skip
    ("quit", False, [("QUIT", 221, "")]),
    # ---- RFC 959 transfer parameters
    ("port", True, [("PORT 127,0,0,1,200,10", 200, ""), ("PORT 127,0,0,2,200,10", 504, "bounce"),
                    ("PORT 127,0,0,1,0,21", 504, ""), ("PORT 1,2,3", 501, "")]),  # fmt: skip
    ("pasv", True, [("PASV", 227, "(127,0,0,1,"), ("PASV x", 501, "")]),
    ("type", True, [("TYPE A", 200, ""), ("TYPE A N", 200, ""), ("TYPE A T", 504, ""), ("TYPE E", 504, ""),
                    ("TYPE L 8", 200, ""), ("TYPE I", 200, ""), ("TYPE", 501, "")]),  # fmt: skip
    ("stru", False, [("STRU F", 200, ""), ("STRU R", 504, ""), ("STRU P", 504, "")]),
    ("mode", False, [("MODE S", 200, ""), ("MODE B", 504, ""), ("MODE C", 504, "")]),
    # ---- RFC 959 service commands (no data connection)
    ("retr-stor-need-data-connection", True, [("RETR f.txt", 425, ""), ("STOR n.txt", 425, ""), ("LIST", 425, ""),
                                              ("NLST", 425, ""), ("MLSD", 425, ""), ("RETR nope", 550, "")]),  # fmt: skip
    ("stou-appe-args", True, [("STOR", 501, ""), ("APPE", 501, ""), ("STOU", 425, "")]),
    ("allo", True, [("ALLO 100", 202, ""), ("ALLO 100 R 10", 202, "")]),
    ("rest", True, [("REST 0", 350, ""), ("REST x", 501, ""), ("REST", 501, "")]),
    ("rnfr-rnto", True, [("RNTO x", 503, ""), ("RNFR nope", 550, ""), ("RNFR f.txt", 350, ""), ("NOOP", 200, ""),
                         ("RNTO g.txt", 503, "RNFR")]),  # fmt: skip
    ("rnto-into-itself", True, [("MKD rd", 257, ""), ("MKD rd/sub", 257, ""), ("RNFR rd", 350, ""),
                                ("RNTO rd/sub/x", 553, "into itself"), ("RNFR rd", 350, ""), ("RNTO rd2", 250, ""),
                                ("RNFR f.txt", 350, ""), ("RNTO f.txt/x", 550, "")]),  # fmt: skip
    ("abor-idle", False, [("ABOR", 225, "")]),
    ("dele-rmd-mkd", True, [("MKD x/y", 550, ""), ("MKD 'q\"", 257, '"/\'q"""'), ("RMD 'q\"", 250, ""),
                            ("DELE nope", 550, ""), ("RMD /", 550, "")]),  # fmt: skip
    ("pwd", True, [("PWD", 257, '"/"'), ("PWD x", 501, "")]),
    ("site", True, [("SITE HELP", 214, "CHMOD"), ("SITE HELP CHMOD", 214, "CHMOD"), ("SITE HELP NOSUCH", 501, ""),
                    ("SITE NOSUCH", 500, ""), ("SITE", 501, "")]),  # fmt: skip
    ("syst", False, [("SYST", 215, "UNIX Type: L8")]),
    ("stat", True, [("STAT", 211, "Logged in as alice"), ("STAT /", 212, "f.txt"), ("STAT f.txt", 213, "f.txt"),
                    ("STAT nope", 550, "")]),  # fmt: skip
    ("stat-before-login", False, [("STAT", 211, "Not logged in"), ("STAT /", 530, "")]),
    ("help", False, [("HELP", 214, "RETR"), ("HELP retr", 214, "RETR"), ("HELP NOSUCH", 502, "")]),
    ("noop", False, [("NOOP", 200, ""), ("NOOP x", 501, "")]),
    ("unknown", False, [("XYZZY", 500, "not understood")]),
    ("login-first", False, [("PWD", 530, ""), ("RETR x", 530, ""), ("SIZE x", 530, ""), ("MLST", 530, "")]),
    # ---- RFC 1123 / RFC 775 X aliases
    ("x-aliases", True, [("XMKD xd", 257, ""), ("XCWD xd", 250, ""), ("XPWD", 257, '"/xd"'), ("XCUP", 250, ""),
                         ("XRMD xd", 250, "")]),  # fmt: skip
    # ---- RFC 2389
    ("feat", False, [("FEAT", 211, " MLST type*;size*;"), ("FEAT x", 501, "")]),
    ("opts", False, [("OPTS", 501, ""), ("OPTS NOSUCH x", 501, ""), ("OPTS UTF8 ON", 200, ""),
                     ("OPTS MLST type;nosuch;SIZE;", 200, "MLST OPTS type;size;")]),  # fmt: skip
    # ---- RFC 2428
    ("epsv", True, [("EPSV", 229, "(|||"), ("EPSV 1", 229, ""), ("EPSV 2", 522, "(1)"), ("EPSV x", 501, ""),
                    ("EPSV ALL", 200, ""), ("PASV", 503, ""), ("PORT 127,0,0,1,200,10", 503, ""),
                    ("EPRT |1|127.0.0.1|51210|", 503, ""), ("EPSV", 229, "")]),  # fmt: skip
    ("eprt", True, [("EPRT |1|127.0.0.1|51210|", 200, ""), ("EPRT |2|::1|51210|", 522, "(1)"),
                    ("EPRT |3|x|51210|", 522, ""), ("EPRT |1|127.0.0.2|51210|", 504, ""), ("EPRT x", 501, "")]),  # fmt: skip
    # ---- RFC 3659
    ("mdtm", True, [("MDTM f.txt", 213, ""), ("MDTM /", 550, ""), ("MDTM nope", 550, "")]),
    ("size", True, [("SIZE f.txt", 213, "213 3"), ("SIZE /", 550, ""), ("TYPE A", 200, ""), ("SIZE f.txt", 550, "ASCII")]),
    ("mlst", True, [("MLST", 250, " /"), ("MLST f.txt", 250, "\n type=file;size=3;"), ("MLST nope", 550, "")]),
    ("mlsd-file", True, [("EPSV", 229, ""), ("MLSD f.txt", 501, "")]),
    # ---- not an RFC command, documented as an extension
    ("mfmt", True, [("MFMT 20200102030405 f.txt", 213, "Modify=20200102030405; /f.txt"), ("MFMT 2020 f.txt", 501, "")]),
    # ---- RFC 4217 / RFC 2228 (no TLS handshake here; see test_ftps)
    ("auth-args", False, [("AUTH", 501, ""), ("AUTH KERBEROS_V4", 504, ""), ("PBSZ 0", 503, ""), ("PROT P", 503, ""),
                          ("CCC", 534, "")]),  # fmt: skip
    ("auth-after-login", True, [("AUTH TLS", 503, "before login")]),
    ("rfc2228-unused", False, [("ADAT x", 502, ""), ("MIC x", 502, ""), ("CONF x", 502, ""), ("ENC x", 502, "")]),
    # ---- RFC 7151
    ("host", False, [("HOST ftp.example.com", 220, ""), ("HOST", 501, ""), ("USER alice", 331, ""),
                     ("HOST ftp.example.com", 503, ""), ("PASS s3cret-pw", 230, ""), ("HOST x", 503, "")]),  # fmt: skip
    ("feat-host", False, [("FEAT", 211, " HOST")]),
]




@pytest.mark.parametrize("login,steps", [pytest.param(lg, st, id=i) for i, lg, st in ROWS])
def test_exchange(tmp_path: Path, login: bool, steps: list[Step]) -> None:
    (tmp_path / "f.txt").write_bytes(b"abc")
    d = Driver(tmp_path, SessionSettings(tls_available=True))
    if login:
        d.login()
    for line, want, text in steps:
        got = d.reply(line)
        assert got.code == want, (line, got)
        assert text in d.replies[-1].encode().decode().replace("\r\n", "\n"), (line, got)
