"""Drive a `Session` the way control.py does, with no socket and no event loop.

Replies and events are recorded; actions are answered at once, depth-first as
control.perform does: a password check against a small table, a passive port,
a transfer done on the disk (files read and written in the temporary home,
listings drained), the TLS switch. A test can hold transfers to play the
commands that arrive while one runs."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Mapping

from ftpcluster.worker.command_table import COMMAND_TABLE
from ftpcluster.worker.commands import CommandSpec
from ftpcluster.worker.protocol import (
    AbortTransfer,
    Close,
    ClosePassive,
    Event,
    OpenPassive,
    Output,
    Reply,
    RunBlocking,
    SetActive,
    StartTLS,
    Transfer,
    TransferResult,
    VerifyPassword,
)
from ftpcluster.worker.session import Session, SessionSettings, User

PASSWORD = "s3cret-pw"  # the same as the end-to-end servers (support_server.PASSWORD)


class Driver:
    """One session over `home`; alice may write, bob is read-only (both with PASSWORD)."""

    def __init__(self, home: Path, settings: SessionSettings | None = None, client_ip: str = "127.0.0.1",
                 commands: Mapping[str, CommandSpec] = COMMAND_TABLE) -> None:  # fmt: skip
        self.home = home
        self.s = Session(settings or SessionSettings(), client_ip, "1-2-3", commands)
        self.replies: list[Reply] = []
        self.events: list[Event] = []
        self.actions: list[Any] = []  # every action, in order
        self.sent = b""  # what the last send transfer put on the data connection
        self.upload = b"data"  # what the next receive transfer reads from the client
        self.hold_transfers = False  # keep Transfer actions running until finish()
        self.held: Transfer | None = None
        self.auto_tls = True  # answer StartTLS with tls_done() at once
        self.passive_fails = ""  # a message: the next OpenPassive fails with it
        self.server_closed = False
        self.take(self.s.greeting())

    # ------------------------------------------------------------ input
    def feed(self, data: bytes) -> list[Reply]:
        """Bytes from the client; returns the replies they caused."""
        start = len(self.replies)
        self.take(self.s.receive_data(data))
        return self.replies[start:]

    def send(self, line: str | bytes) -> list[Reply]:
        return self.feed((line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line) + b"\r\n")

    def code(self, line: str | bytes) -> int:
        """The final reply code of one command line (0 if it got none)."""
        finals = [r.code for r in self.send(line) if r.code >= 200]
        return finals[-1] if finals else 0

    def reply(self, line: str | bytes) -> Reply:
        """The last reply to one command line."""
        got = self.send(line)
        assert got, f"no reply to {line!r}"
        return got[-1]

    def text(self, line: str | bytes) -> str:
        """The last reply as it goes on the wire (lines joined by LF)."""
        return self.reply(line).encode().decode("utf-8", "surrogateescape").replace("\r\n", "\n").rstrip("\n")

    def login(self, user: str = "alice", password: str = PASSWORD) -> None:
        assert self.code(f"USER {user}") == 331
        assert self.code(f"PASS {password}") == 230

    def finish(self, result: TransferResult | None = None) -> list[Reply]:
        """End the held transfer (ok by default); returns the replies that follow."""
        t, self.held = self.held, None
        assert t is not None, "no transfer is held"
        start = len(self.replies)
        self.take(self.s.transfer_done(result or self._run(t)))
        return self.replies[start:]

    def event_names(self) -> list[str]:
        return [e.name for e in self.events]

    # ------------------------------------------------------------ outputs
    def take(self, outputs: list[Output]) -> None:
        queue: collections.deque[Output] = collections.deque(outputs)
        while queue:
            out = queue.popleft()
            if isinstance(out, Reply):
                self.replies.append(out)
                continue
            if isinstance(out, Event):
                self.events.append(out)
                continue
            self.actions.append(out)
            more = self._answer(out)
            queue.extendleft(reversed(more))

    def _answer(self, action: Any) -> list[Output]:
        s = self.s
        if isinstance(action, VerifyPassword):
            ok = action.password == PASSWORD and action.user in ("alice", "bob")
            return s.auth_done(User(action.user, str(self.home), read_only=action.user == "bob") if ok else None)
        if isinstance(action, OpenPassive):
            if self.passive_fails:
                return s.passive_failed(self.passive_fails)
            return s.passive_ready("127.0.0.1", 50000, action.extended)
        if isinstance(action, Transfer):
            if self.hold_transfers:
                self.held = action
                return []
            return s.transfer_done(self._run(action))
        if isinstance(action, AbortTransfer):
            if self.held is not None:
                self.held = None
                return s.transfer_done(TransferResult("aborted"))
            return []
        if isinstance(action, StartTLS):
            return s.tls_done() if self.auto_tls else []
        if isinstance(action, Close):
            self.server_closed = True
            return []
        if isinstance(action, (ClosePassive, SetActive)):
            return []
        if isinstance(action, RunBlocking):  # control.py runs it on a thread
            try:
                result = action.call()
            except Exception as e:  # noqa: BLE001 - handed back like control.py does
                result = e
            return s.blocking_done(result)
        raise AssertionError(f"unknown action {action!r}")

    def _run(self, t: Transfer) -> TransferResult:
        """Do the transfer on the disk, as the data channel would."""
        if t.kind == "send_lines":
            assert t.lines is not None
            self.sent = b"".join(t.lines)
        elif t.kind == "send_file":
            with open(t.path, "rb") as f:
                f.seek(t.offset)
                data = f.read()
            self.sent = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") if t.ascii else data
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
            if t.temp_path:
                fd = os.open(t.temp_path, flags | os.O_EXCL, 0o644)
            elif t.exclusive:
                fd = os.open(t.path, flags | os.O_EXCL, 0o644)
            elif t.append:
                fd = os.open(t.path, flags | os.O_APPEND, 0o644)
            else:
                fd = os.open(t.path, flags, 0o644)
                os.ftruncate(fd, t.offset)
                os.lseek(fd, t.offset, os.SEEK_SET)
            try:
                os.write(fd, self.upload.replace(b"\r\n", b"\n") if t.ascii else self.upload)
            finally:
                os.close(fd)
            if t.temp_path:
                os.replace(t.temp_path, t.path)
            return TransferResult("ok", bytes=len(self.upload))
        return TransferResult("ok", bytes=len(self.sent))


def make_home(root: Path) -> Path:
    """A home with a file, a directory, and links inside, outside and dangling."""
    home = root / "home"
    (home / "d").mkdir(parents=True)
    (home / "d" / "g.txt").write_bytes(b"g")
    (home / "f.txt").write_bytes(b"abc")
    (home / "lines.txt").write_bytes(b"one\ntwo\n")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    (home / "in_link").symlink_to(home / "d")
    (home / "out_link").symlink_to(outside)
    (home / "file_link").symlink_to(outside / "secret.txt")
    (home / "dangling_out").symlink_to(outside / "does-not-exist")
    return home
