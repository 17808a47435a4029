"""The server's command table, built from an explicit list of handler modules.

Order matters only for reading: each verb is claimed by exactly one module."""

from __future__ import annotations

from types import MappingProxyType

from . import handlers_auth, handlers_files, handlers_info, handlers_nav, handlers_tls, handlers_transfer
from .commands import CommandSpec, build_table

HANDLER_MODULES = (handlers_auth, handlers_nav, handlers_files, handlers_transfer, handlers_info, handlers_tls)

COMMAND_TABLE: MappingProxyType[str, CommandSpec] = MappingProxyType(build_table(HANDLER_MODULES))
