"""The reply codes of docs/conformance.md end to end: a few rows of the table in
tests/session/test_conformance.py (which checks every row against the session
core) over one shared server (conftest `rfc_server`), one raw control connection
per row; STOU's 150 over a real data connection; and the doc's references."""

from __future__ import annotations

import socket
import pytest

from .session.test_conformance import ROWS, Step
from .support_server import Server
from .test_bad_input import Raw

# The table itself runs against the session core (tests/session/test_conformance.py);
# these rows also go over a real server, to show the wire gives the same answers.
END_TO_END = ("user-pass", "rein", "epsv", "stat", "mlst", "auth-args")


@pytest.fixture(scope="module")
def srv(rfc_server: Server) -> Server:
    (rfc_server.home / "f.txt").write_bytes(b"abc")
    return rfc_server


@pytest.mark.parametrize("login,steps", [pytest.param(lg, st, id=i) for i, lg, st in ROWS if i in END_TO_END])
def test_exchange(srv: Server, login: bool, steps: list[Step]) -> None:
    c = Raw(srv)
    try:
        if login:
            c.login()
        for line, want, text in steps:
            got, reply = c.reply_to(line)
            assert got == want, (line, reply)
            assert text.encode() in reply, (line, reply)
    finally:
        c.close()


def test_stou_names_the_file_it_made(srv: Server) -> None:
    """RFC 1123 4.1.2.9: the 150 reply to STOU carries "FILE: name"."""
    (srv.home / "sub").mkdir(exist_ok=True)
    c = Raw(srv)
    c.login()
    for arg, shown in (("u.txt", b"FILE: u.txt"), ("sub/u.txt", b"FILE: /sub/u.txt")):
        (srv.home / arg).write_bytes(b"taken")
        data = c.pasv()
        code, text = c.reply_to(f"STOU {arg}")
        assert code == 150 and (shown + b".1") in text, text
        data.sendall(b"new")
        data.shutdown(socket.SHUT_WR)
        data.close()
        assert c.reply()[0] == 226
        assert (srv.home / (arg + ".1")).read_bytes() == b"new"
    c.close()


DOC_FILES = {"C": "test_conformance.py", "E": "test_rfc_edges.py", "F": "test_ftp_commands.py",
             "B": "test_bad_input.py", "S": "test_ftps.py", "L": "test_clients.py"}  # fmt: skip


def test_every_doc_row_names_an_existing_test() -> None:
    """docs/conformance.md: every table row names a test, and every test it names exists."""
    import re
    from pathlib import Path

    tests = Path(__file__).parent
    doc = (tests.parent / "docs" / "conformance.md").read_text()
    lines = doc.splitlines()
    # Table lines, less each table's header (the line above its |---| separator).
    rows = [ln for i, ln in enumerate(lines) if ln.startswith("| ")
            and not (i + 1 < len(lines) and lines[i + 1].startswith("|---"))]  # fmt: skip
    assert len(rows) > 60
    sources = {k: (tests / f).read_text() for k, f in DOC_FILES.items()}
    sources["T"] = "".join(f.read_text() for f in sorted((tests / "session").glob("test_*.py")))
    table_ids = {i for i, _, _ in ROWS}
    for row in rows:
        refs = re.findall(r"\b([CEFBSLT])::([\w-]+)", row)
        assert refs, f"row names no test: {row}"
        for kind, name in refs:
            if kind == "C" and not name.startswith("test_"):
                assert name in table_ids, f"no table row {name!r}: {row}"
            else:
                assert f"def {name}(" in sources[kind], f"no test {kind}::{name}: {row}"
