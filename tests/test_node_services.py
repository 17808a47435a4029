"""A node's services without a node: `build_services` over a small stand-in for
`node_api.NodeCore`, events in as (Event, SessionInfo), decisions out. No process,
no socket, no event loop running."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ftpcluster import config as config_mod
from ftpcluster.cluster.presence import Presence
from ftpcluster.users import Authenticator
from ftpcluster.worker.protocol import Event, EventName, SessionInfo
from ftpcluster.worker.services import build_services


class Core:
    """Just what NodeCore asks for; records what the services publish."""

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.node_id, self.slot = cfg, 1, 0
        self.loop = asyncio.new_event_loop()
        self.stopped = asyncio.Event()
        self.auth = Authenticator({})
        self.open_sessions: list[Any] = []
        self.published: list[tuple[str, str, dict[str, Any]]] = []

    def memcache(self) -> Any:
        raise AssertionError("no memcached in this test")

    def track(self, task: Any) -> Any:
        return task

    def publish_raw(self, name: str, ip: str, **fields: Any) -> None:
        self.published.append((str(name), ip, fields))


@pytest.fixture
def core(tmp_path: Path):
    cfg = config_mod.from_dict(
        {"server": {"state_dir": str(tmp_path / "state"), "max_clients_per_host": 1},
         "tls": {"enabled": False}, "ban": {"enabled": False}, "memcache": {"enabled": False}},
        tmp_path / "ftpcluster.toml",
    )  # fmt: skip
    cfg.state_dir.mkdir()
    Presence(cfg.state_dir / "presence.shm", create=True)  # the supervisor makes it before forking
    c = Core(cfg)
    yield c
    c.loop.close()


def test_services_come_from_the_config_in_one_fixed_order(core: Core) -> None:
    svc = build_services(core, count=lambda name, labels: None)
    assert svc.limits is not None and svc.transfer_limits is not None
    assert svc.bans is None and svc.proxy is None and svc.tls is None and svc.metrics is None
    assert svc.passive_proxy_reader() is None
    subs = svc.subscribers()
    assert subs[0] is svc.session_log and subs[-2:] == [svc.limits, svc.transfer_limits]
    assert svc.admission() == [svc.limits.admission] and svc.user_gates() == [svc.limits.user_gate]


def test_a_subscriber_needs_only_session_info(core: Core) -> None:
    """Per-host limit over SessionInfo events: a second login from the same address is
    refused at PASS and raises the BanOnEvent event; a disconnect frees the place."""
    svc = build_services(core, count=lambda name, labels: None)
    subs = [s for s in svc.subscribers() if s is not svc.session_log]  # logging is not set up here
    first = SessionInfo("1-1-1", "192.0.2.7")
    for sub in subs:
        sub(Event(EventName.CONNECT), first)
    first.user, first.home = "alice", "/nonexistent"
    for sub in subs:
        sub(Event("login", {"user": "alice"}), first)  # a plain string still works
    gate = svc.user_gates()[0]
    assert gate("bob", "192.0.2.7") is not None
    assert gate("bob", "192.0.2.8") is None
    assert core.published == [(EventName.MAX_CLIENTS_PER_HOST, "192.0.2.7", {"user": "bob"})]
    for sub in subs:
        sub(Event(EventName.DISCONNECT), first)
    assert gate("bob", "192.0.2.7") is None
