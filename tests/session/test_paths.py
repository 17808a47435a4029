"""Confinement to the home, per command, and the read-only account.
(Moved from tests/test_bad_input.py: the core refuses these without a socket.)"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from .driver import Driver

ESCAPES = ["..", "../..", "/..", "/../../etc/passwd", "sub/../../x", "../../../../../etc/passwd",
           "..\\..\\etc\\passwd", "d\\g.txt", "d/g.txt\x00.jpg", "\x00", "out_link", "out_link/secret.txt",
           "/out_link/secret.txt", "file_link", "dangling_out", "in_link/../out_link/secret.txt",
           "d/\x01name", ".ftpcluster-upload.1.abc"]  # fmt: skip
LINKS = {"out_link", "file_link", "dangling_out"}  # entries of the home that point outside
COMMANDS = ["CWD {}", "RETR {}", "SIZE {}", "MDTM {}", "LIST {}", "NLST {}", "MLST {}", "MLSD {}", "STAT {}",
            "STOR {}", "APPE {}", "STOU {}", "MKD {}/new", "RMD {}", "DELE {}", "RNFR {}", "SITE CHMOD 777 {}",
            "MFMT 20200101000000 {}"]  # fmt: skip


def _outside(home: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mode, p.read_bytes()) for p in (home.parent / "outside").iterdir()}


@pytest.mark.parametrize("template", COMMANDS)
def test_path_escapes_refused(make: Callable[..., Driver], home: Path, template: str) -> None:
    before = _outside(home)
    d = make("alice")
    assert d.code("EPSV") == 229  # a data connection is ready: only the path can refuse
    for path in ESCAPES:
        if path in LINKS and template in ("DELE {}", "RNFR {}"):
            continue  # these act on the link itself: test_symlinks_act_on_the_link
        line = template.format(path)
        assert d.code(line) == 550, line
    assert not [a for a in d.actions if type(a).__name__ == "Transfer"]
    assert _outside(home) == before
    assert d.code("PWD") == 257


def test_rnto_escapes_refused(make: Callable[..., Driver], home: Path) -> None:
    d = make("alice")
    for path in ESCAPES:
        if path in LINKS:
            continue  # RNTO onto a link's name replaces the link (rename(2)), inside the home
        assert d.code("RNFR f.txt") == 350
        assert d.code(f"RNTO {path}") == 550, path
    assert (home / "f.txt").exists()


def test_links_inside_the_home_work(drv: Driver) -> None:
    d = drv
    assert d.code("CWD in_link") == 250
    assert d.code("SIZE g.txt") == 213
    assert d.code("CWD /d/..") == 250
    assert d.text("PWD").startswith('257 "/"')


def test_symlinks_act_on_the_link(drv: Driver, home: Path) -> None:
    """DELE and RNFR/RNTO act on a link itself, like rm and mv; the target stays."""
    d = drv
    assert d.code("DELE file_link") == 250
    assert not (home / "file_link").is_symlink() and (home.parent / "outside" / "secret.txt").exists()
    assert d.code("RNFR out_link") == 350 and d.code("RNTO moved_link") == 250
    assert (home / "moved_link").is_symlink()
    assert d.code("RMD in_link") == 550  # a link to a directory is not a directory to remove
    assert (home / "d").is_dir()


def test_listing_hides_what_is_outside(drv: Driver) -> None:
    d = drv
    assert d.code("EPSV") == 229 and d.code("MLSD") == 226
    facts = {line.split(" ", 1)[1]: line.split(" ", 1)[0] for line in d.sent.decode().splitlines()}
    assert "type=dir;" in facts["in_link"]
    assert "type=OS.unix=symlink;" in facts["out_link"] and "type=OS.unix=symlink;" in facts["file_link"]
    assert "size=6;" not in facts["file_link"]  # the secret's size is not shown


def test_read_only_user(make: Callable[..., Driver], home: Path) -> None:
    snapshot = sorted((p.name, p.lstat().st_mode, p.lstat().st_mtime) for p in home.rglob("*"))
    d = make("bob")
    assert "read-only" in d.replies[-1].text
    for line in ("STOR new.txt", "STOR f.txt", "APPE f.txt", "STOU", "STOU x", "DELE f.txt", "MKD d2",
                 "XMKD d2", "RMD d", "XRMD d", "RNFR f.txt", "RNTO x", "SITE CHMOD 777 f.txt",
                 "MFMT 20200101000000 f.txt"):
        assert d.code(line) == 550, line
    # Reading still works.
    assert d.code("SIZE f.txt") == 213
    assert d.code("EPSV") == 229
    assert [r.code for r in d.send("RETR f.txt")] == [150, 226] and d.sent == b"abc"
    assert d.code("EPSV") == 229 and d.code("MLSD") == 226
    assert b"perm=r;" in d.sent and b"perm=radfw" not in d.sent
    assert "perm=r;" in d.text("MLST f.txt")
    assert sorted((p.name, p.lstat().st_mode, p.lstat().st_mtime) for p in home.rglob("*")) == snapshot
