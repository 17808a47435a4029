"""The filesystem port: the core reaches files only through `FS` (passed in as a
factory), and the calls that can block (listings, STOU's name search) are
handed to the I/O layer as RunBlocking actions instead of running inline."""

from __future__ import annotations

import ast
import errno
import inspect
from pathlib import Path
from typing import Any, Callable

import pytest

from ftpcluster.worker import handlers_auth, handlers_files, handlers_info, handlers_nav, handlers_tls
from ftpcluster.worker import handlers_transfer, session
from ftpcluster.worker.fs_port import LocalFS
from ftpcluster.worker.protocol import RunBlocking, Transfer, TransferResult
from ftpcluster.worker.session import Session, SessionSettings
from ftpcluster.worker.state import State

from .driver import Driver

CORE = [session, handlers_auth, handlers_files, handlers_info, handlers_nav, handlers_tls, handlers_transfer]
# os attributes that are string work or constants, not I/O
PURE_OS = {"path.dirname", "path.join", "path.basename", "R_OK", "W_OK", "X_OK"}


@pytest.mark.parametrize("module", CORE, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_core_does_no_filesystem_io_itself(module: Any) -> None:
    tree = ast.parse(inspect.getsource(module))
    uses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
            uses.add(node.attr)
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "os"):  # fmt: skip
            uses.add(f"{node.value.attr}.{node.attr}")
            uses.discard(node.value.attr)
        if isinstance(node, ast.Name) and node.id == "open":
            uses.add("open()")
    if any(u.startswith("path.") for u in uses):
        uses.discard("path")  # ast.walk sees os.path.join before its os.path
    assert uses <= PURE_OS, uses - PURE_OS


class Recording(LocalFS):
    """The local disk, with a log of the port calls the core makes."""

    calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if callable(attr) and not name.startswith("_"):
            Recording.calls.append(name)
        return attr


def test_the_session_uses_the_port_it_is_given(home: Path) -> None:
    Recording.calls = []
    d = Driver(home)
    d.s = Session(SessionSettings(), "127.0.0.1", "1-2-3", fs=Recording)
    d.take(d.s.greeting())
    d.login()
    for line in ("MKD x", "CWD x", "CDUP", "RMD x", "SIZE f.txt", "MDTM f.txt", "MFMT 20200101000000 f.txt",
                 "SITE CHMOD 644 f.txt", "RNFR f.txt", "RNTO g.txt", "DELE g.txt", "STAT d"):
        assert d.code(line) < 400, line
    d.code("EPSV")
    assert d.code("LIST") == 226
    d.code("EPSV")
    assert d.code("STOU") == 226
    assert {"mkdir", "is_dir", "can", "rmdir", "stat", "utime", "chmod", "rename", "remove", "listing",
            "unique_name", "resolve", "resolve_entry"} <= set(Recording.calls)  # fmt: skip


@pytest.mark.parametrize("line", ["LIST", "NLST", "MLSD", "STOU", "STAT /"])
def test_blocking_calls_are_actions(make: Callable[..., Driver], line: str) -> None:
    """The core hands the call over and waits (commands behind it queue in order)."""
    d = make("alice")
    d.code("EPSV")
    out = d.s.receive_data(line.encode() + b"\r\nNOOP\r\nPWD\r\n")
    assert [type(o).__name__ for o in out if not hasattr(o, "name")] == ["RunBlocking"]
    assert d.s.state is State.FILESYSTEM and len(d.s._queue) == 2
    action = out[-1]
    assert isinstance(action, RunBlocking)
    codes = [o.code for o in d.s.blocking_done(action.call()) if hasattr(o, "code")]
    if line.startswith("STAT"):
        assert codes == [212, 200, 257] and d.s.state is State.READY
    else:  # the queued lines wait for the transfer now
        assert codes == [150] and d.s.state is State.TRANSFER
        assert isinstance(d.s.transfer, Transfer)
        assert [o.code for o in d.s.transfer_done(TransferResult("ok")) if hasattr(o, "code")] == [226, 200, 257]


def test_listing_is_built_before_the_transfer(drv: Driver) -> None:
    drv.code("EPSV")
    drv.code("LIST")
    t = [a for a in drv.actions if isinstance(a, Transfer)][-1]
    assert not inspect.isgenerator(t.lines)  # no scandir left for the loop to run


def test_a_failed_blocking_call_is_answered(make: Callable[..., Driver]) -> None:
    d = make("alice")
    d.code("EPSV")
    out = d.s.receive_data(b"LIST\r\n")
    after = d.s.blocking_done(PermissionError(errno.EACCES, "denied"))
    assert [(o.code, o.text) for o in after if hasattr(o, "code")] == [(550, "Permission denied")]
    assert d.s.state is State.READY and isinstance(out[-1], RunBlocking)
    d.s.receive_data(b"STOU\r\n")
    after = d.s.blocking_done(OSError(errno.EIO, "disk"))
    assert [o.code for o in after if hasattr(o, "code")] == [451]


def test_no_transfer_no_listing(make: Callable[..., Driver]) -> None:
    """Without a data connection the directory is not read at all."""
    d = make("alice")
    assert d.code("LIST") == 425
    assert not [a for a in d.actions if isinstance(a, RunBlocking)]


def test_quit_while_a_blocking_call_is_out(make: Callable[..., Driver]) -> None:
    """Everything waits behind a filesystem call, QUIT too (it is short)."""
    d = make("alice")
    d.code("EPSV")
    out = d.s.receive_data(b"STOU\r\nQUIT\r\n")
    assert not [o for o in out if hasattr(o, "code")]
    after = d.s.blocking_done(out[-1].call())  # type: ignore[union-attr]
    assert [type(o).__name__ for o in after if not hasattr(o, "name")][:2] == ["Reply", "Transfer"]
