"""Moving around: PWD CWD CDUP (and XPWD XCWD XCUP)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .commands import Arg, command
from .fs import PathError
from .replies import quote_path

if TYPE_CHECKING:
    from .session import Session


@command("PWD", help="PWD: print the current directory", aliases=("XPWD",))
def pwd(s: Session, arg: str) -> None:
    s.reply(257, f"{quote_path(s.cwd)} is the current directory")


@command("CWD", arg=Arg.REQUIRED, help="CWD <dir>: change directory", aliases=("XCWD",))
def cwd(s: Session, arg: str) -> None:
    r = s.resolve(arg, must_exist=True)
    if not s.fs.is_dir(r.real):
        raise PathError("Not a directory")
    if not s.fs.can(r.real, os.X_OK):
        raise PathError("Permission denied")
    s.cwd = r.virtual
    s.reply(250, f'Directory changed to {quote_path(r.virtual)}')


@command("CDUP", help="CDUP: go to the parent directory", aliases=("XCUP",))
def cdup(s: Session, arg: str) -> None:
    if s.cwd == "/":
        s.reply(250, 'Directory changed to "/"')
        return
    cwd(s, "..")
