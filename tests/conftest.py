"""Shared fixtures: real servers started as processes (see support_server.py)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable, Iterator

import pytest

from .support_server import Server, make_server


def _factory(base: Path) -> Iterator[Callable[..., Server]]:
    """make(nodes=1, name="a", start=True, **config_sections) -> a Server under `base`
    (started unless start=False); every one is stopped and its ports released after."""
    started: list[Server] = []

    def make(nodes: int = 1, name: str = "a", start: bool = True, **kw) -> Server:
        srv = make_server(base / name, **kw)
        started.append(srv)
        if start:
            srv.start(nodes=nodes)
        return srv

    yield make
    for srv in started:
        srv.stop(signal.SIGINT)  # cleanup: a fast stop (tests of TERM call stop() themselves)
        srv.release()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Servers for one test."""
    yield from _factory(tmp_path)


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Servers a whole test module shares (one start for many checks that leave the
    server as they found it); stopped after the module."""
    yield from _factory(tmp_path_factory.mktemp("module"))


@pytest.fixture
def server(server_factory: Callable[..., Server]) -> Server:
    """One plain FTP server with user alice."""
    return server_factory()


@pytest.fixture
def memcached():
    """start(n) -> n real memcached servers on loopback, killed at teardown."""
    from .support_memcached import start_memcached
    from .support_server import require

    require("memcached")
    started = []

    def start(n: int = 1):
        servers = start_memcached(n)
        started.extend(servers)
        return servers

    yield start
    for m in started:
        m.stop()


@pytest.fixture(scope="session")
def rfc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One plain server with explicit TLS available, shared by the RFC conformance
    tests (test_conformance, test_rfc_edges) so their many small exchanges cost one
    start. Data-session reuse is tested in test_ftps; here plain FTP_TLS must work."""
    srv = make_server(tmp_path_factory.mktemp("rfc"), tls={"require_data_session_reuse": False})
    srv.start()
    yield srv
    srv.stop(signal.SIGINT)
