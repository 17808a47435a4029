"""Hidden temporary upload files of nodes that died: found and removed at node start.

An atomic upload writes `<dir>/.ftpcluster-upload.<pid>.<random>` and renames it
on success; an aborted one is unlinked. A node killed mid-upload (SIGKILL, OOM,
power loss) does neither, and nothing else knows where the file is: uploads go
anywhere in any home, and walking every home at start would cost minutes on a
big tree. So each node appends the path of every temporary file it creates to
its own journal, `<state_dir>/uploads/<pid>-<start time>`, one line each (one
write(2) per upload), and empties it whenever it has no upload in flight.

A starting node reads the journals of processes that are gone (pid absent, or
reused by a process that started at another time) and removes the files they
list that still carry that pid in their name; a live sibling's journal is left
alone, so its uploads in flight are never touched."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import structlog

from .fs import TEMP_PREFIX

log = structlog.get_logger("ftpcluster.worker")


def process_start(pid: int) -> str | None:
    """The start time of `pid` (clock ticks since boot, Linux /proc), "" where /proc is
    absent but the process exists, None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 :].split()[19].decode()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return ""


class UploadJournal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd: int | None = None
        self.path: Path | None = None
        self.in_flight = 0

    def open(self) -> None:
        """Sweep dead nodes' leftovers, then start this node's journal. Never raises:
        without a journal, uploads work and only the clean-up after a crash is lost."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.sweep()
            pid = os.getpid()
            self.path = self.folder / f"{pid}-{process_start(pid) or 0}"
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as e:
            log.warning("upload journal unavailable: temporary files of a crashed node stay", error=str(e))

    def sweep(self) -> int:
        """Remove the temporary files listed by journals of dead processes; returns how many."""
        removed = 0
        for journal in self.folder.iterdir():
            pid_s, _, start = journal.name.partition("-")
            if not pid_s.isascii() or not pid_s.isdigit():
                continue
            pid = int(pid_s)
            now = process_start(pid)
            if now is not None and (now == start or not now or start == "0"):
                continue  # alive (or cannot tell): its uploads may be in flight
            mine = f"{TEMP_PREFIX}{pid}."
            with contextlib.suppress(OSError):
                for line in journal.read_bytes().splitlines():
                    path = os.fsdecode(line)
                    if os.path.basename(path).startswith(mine):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                            removed += 1
                journal.unlink()
        if removed:
            log.info("removed temporary upload files of stopped nodes", files=removed)
        return removed

    def started(self, temp_path: str) -> None:
        self.in_flight += 1
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, os.fsencode(temp_path) + b"\n")

    def finished(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if self.in_flight == 0 and self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # nothing in flight: keep the journal small

    def close(self) -> None:
        """A clean stop: every upload ended (its temp file renamed or removed)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if self.path is not None and self.in_flight == 0:
                with contextlib.suppress(OSError):
                    self.path.unlink()
