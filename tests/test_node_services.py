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


@pytest.fixture
def log_state() -> Any:
    """logs.configure() sets process-wide state: put it back for the tests after."""
    from ftpcluster import logs

    saved = dict(vars(logs._State))
    yield
    for k, v in saved.items():
        if not k.startswith("__"):
            setattr(logs._State, k, v)


def test_subscribers_name_what_they_hear(core: Core, log_state: Any) -> None:
    """The node routes each event name once (protocol.hears): a subscriber with an
    `events` set hears only those, one without hears everything; with no command trace
    and no metrics, commands are counted by a no-op instead of an event each."""
    from ftpcluster import logs
    from ftpcluster.config import LogConfig
    from ftpcluster.worker.protocol import hears, listens

    logs.configure(LogConfig(level="info"), node=1)
    svc = build_services(core, count=lambda name, labels: None)
    heard = {name: [s for s in svc.subscribers() if hears(s, name)] for name in EventName}
    assert heard[EventName.CONNECT] == [svc.session_log, svc.limits]
    assert heard[EventName.LOGIN] == [svc.session_log, svc.limits, svc.transfer_limits]
    assert heard[EventName.USER] == [] and heard[EventName.COMMAND] == []
    assert svc.command_counter() is not None  # nobody hears COMMAND: a counter, no event

    @listens(EventName.DELETE)
    def only_deletes(event: Event, info: SessionInfo | None) -> None: ...

    assert hears(only_deletes, EventName.DELETE) and not hears(only_deletes, EventName.LOGIN)
    assert hears(lambda e, i: None, EventName.LOGIN)  # no `events`: everything

    logs.configure(LogConfig(level="info", trace={"command": "debug"}), node=1)
    assert hears(svc.session_log, EventName.COMMAND)
    assert svc.command_counter() is None  # the command trace hears them: events again
    logs.configure(LogConfig(level="warning"), node=1)
    assert not hears(svc.session_log, EventName.CONNECT) and hears(svc.session_log, EventName.LOGIN_FAILED)
