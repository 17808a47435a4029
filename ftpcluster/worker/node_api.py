"""What a node service (bans, limits, transfer limits) may use of its node.

A Protocol, so the service modules need not import node.py: the node imports
them to build its `NodeServices`, and nothing imports back (no cycle)."""

from __future__ import annotations

import asyncio
from typing import Any, Collection, Protocol

from ..config import Config
from ..users import Authenticator


class OpenSession(Protocol):
    """A session of the node as a service may act on it (e.g. end it for a ban)."""

    client_ip: str
    closing: bool

    @property
    def user_name(self) -> str | None: ...

    def kick(self, code: int, text: str) -> None: ...


class NodeCore(Protocol):
    cfg: Config
    node_id: int
    slot: int  # this node's row in the host's shared tables
    loop: asyncio.AbstractEventLoop
    stopped: asyncio.Event
    auth: Authenticator

    @property
    def open_sessions(self) -> Collection[OpenSession]: ...

    def memcache(self) -> Any: ...

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]: ...

    def publish_raw(self, name: str, ip: str, **fields: Any) -> None: ...
