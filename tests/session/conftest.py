"""The session tier: a `Session` over a temporary home, no process, no socket."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from ftpcluster.worker.session import SessionSettings

from .driver import Driver, make_home


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_home(tmp_path)


@pytest.fixture
def make(home: Path) -> Callable[..., Driver]:
    """make(login=None|"alice"|"bob", **settings) -> a Driver over the test's home."""

    def build(login: str | None = None, client_ip: str = "127.0.0.1", **settings: object) -> Driver:
        d = Driver(home, SessionSettings(**settings), client_ip=client_ip)  # type: ignore[arg-type]
        if login:
            d.login(login)
        return d

    return build


@pytest.fixture
def drv(make: Callable[..., Driver]) -> Driver:
    """A session logged in as alice."""
    return make("alice")
