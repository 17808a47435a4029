"""The command table: one entry per verb answers HELP, FEAT, argument checks and
"530 log in first" for every command (pyftpdlib's proto_cmds idea), while the
handlers themselves live in small topic modules (`handlers_*.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .session import Session


class Arg(Enum):
    NONE = "none"  # argument refused
    OPTIONAL = "optional"
    REQUIRED = "required"


Handler = Callable[["Session", str], None]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    verb: str
    handler: Handler
    arg: Arg
    auth: bool  # needs a logged-in user
    help: str
    write: bool = False  # changes the filesystem: refused for read-only users
    urgent: bool = False  # handled even while a transfer runs (ABOR, STAT, QUIT, NOOP)
    # Answered at once while a transfer runs, whose 226 follows (REIN, USER): a client
    # that waits for the reply before it reads the data would deadlock otherwise.
    in_transfer: bool = False


COMMANDS: dict[str, CommandSpec] = {}


def command(
    verb: str,
    *,
    arg: Arg = Arg.NONE,
    auth: bool = True,
    help: str = "",
    write: bool = False,
    urgent: bool = False,
    in_transfer: bool = False,
    aliases: tuple[str, ...] = (),
) -> Callable[[Handler], Handler]:
    """Register a handler for `verb` (and its X* aliases)."""

    def register(fn: Handler) -> Handler:
        for v in (verb, *aliases):
            COMMANDS[v] = CommandSpec(v, fn, arg, auth, help or v, write, urgent, in_transfer)
        return fn

    return register


def load_handlers() -> dict[str, CommandSpec]:
    """Import the topic modules so their decorators fill the table."""
    from . import handlers_auth, handlers_files, handlers_info, handlers_nav, handlers_tls, handlers_transfer  # noqa: F401

    return COMMANDS
