"""The command table: one entry per verb answers HELP, FEAT, argument checks and
"530 log in first" for every command (pyftpdlib's proto_cmds idea), while the
handlers themselves live in small topic modules (`handlers_*.py`). The table is
built from an explicit list of those modules (`command_table.py`); a test can
build a session over any other table."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Iterable

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
    """Mark a handler as the one for `verb` (and its X* aliases). Nothing global is
    filled: `build_table` collects the marks from the modules it is given."""

    def mark(fn: Handler) -> Handler:
        specs = tuple(CommandSpec(v, fn, arg, auth, help or v, write, urgent, in_transfer) for v in (verb, *aliases))
        fn.ftp_commands = getattr(fn, "ftp_commands", ()) + specs  # type: ignore[attr-defined]
        return fn

    return mark


def build_table(modules: Iterable[ModuleType]) -> dict[str, CommandSpec]:
    """verb -> spec from the handlers marked with @command in `modules`, in order;
    a verb claimed twice is an error, not a silent override."""
    table: dict[str, CommandSpec] = {}
    for module in modules:
        for fn in vars(module).values():
            for spec in getattr(fn, "ftp_commands", ()):
                if spec.verb in table and table[spec.verb].handler is not spec.handler:
                    raise ValueError(f"{spec.verb} is handled twice ({module.__name__})")
                table[spec.verb] = spec
    return table


def load_handlers() -> dict[str, CommandSpec]:
    """The server's table (for callers outside the core that only need the verbs)."""
    from .command_table import COMMAND_TABLE

    return dict(COMMAND_TABLE)
