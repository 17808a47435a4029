"""Log lines made on an event loop reach the file together, in one write at most
FLUSH_AFTER later; lines from threads without a loop are written at once; the session
log's fast path writes the same fields a structlog logger would."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from ftpcluster import logs
from ftpcluster.config import LogConfig


class CountingFile:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def _configured(tmp_path: Path) -> CountingFile:
    logs.configure(LogConfig(level="info", file=str(tmp_path / "x.log")), node=7)
    sink = CountingFile()
    logs._State.sink = sink
    return sink


def test_lines_on_a_loop_are_written_together(tmp_path: Path) -> None:
    sink = _configured(tmp_path)
    log = logs.get_logger("session", node=7)

    async def main() -> list[str]:
        for i in range(5):
            log.info("connect", n=i)
        logs.emit("info", {"channel": "session", "node": 7, "session": "s1", "event": "login ok"})
        log.debug("below the floor")
        await asyncio.sleep(0)
        log.info("connect", n=5)  # a later loop iteration
        before = list(sink.writes)
        await asyncio.sleep(logs.FLUSH_AFTER * 3)
        return before

    before = asyncio.run(main())
    assert before == []  # nothing written at once
    assert len(sink.writes) == 1
    lines = [json.loads(x) for x in sink.writes[0].splitlines()]
    assert [x["event"] for x in lines] == ["connect"] * 5 + ["login ok", "connect"]
    for x in lines:
        assert x["channel"] == "session" and x["node"] == 7 and x["level"] == "info"
        assert x["timestamp"].endswith("Z") and len(x["timestamp"]) == len("2026-01-01T00:00:00.000000Z")
    # same field order from structlog's logger and from the session log's fast path
    assert list(lines[0]) == ["channel", "node", "n", "event", "level", "timestamp"]
    assert list(lines[-2]) == ["channel", "node", "session", "event", "level", "timestamp"]


def test_thread_without_loop_writes_at_once(tmp_path: Path) -> None:
    sink = _configured(tmp_path)
    got: list[Any] = []

    def worker() -> None:
        logs.get_logger("memcache").warning("server down")
        got.append(list(sink.writes))

    t = threading.Thread(target=worker)
    t.start()
    t.join(5)
    assert len(got) == 1 and len(got[0]) == 1 and json.loads(got[0][0])["event"] == "server down"


def test_lines_left_by_a_stopped_loop_go_out_with_the_next(tmp_path: Path) -> None:
    sink = _configured(tmp_path)

    async def main() -> None:
        logs.get_logger("session").info("last words")  # the loop ends before the flush

    asyncio.run(main())
    assert sink.writes == []
    logs.get_logger("supervisor").info("after the loop")  # no loop here: written at once
    assert [json.loads(x)["event"] for x in "".join(sink.writes).splitlines()] == ["last words", "after the loop"]


def test_composed_session_lines_carry_the_dict_paths_fields(tmp_path: Path) -> None:
    """SessionLogger writes its hot lines as strings (LineTemplate): the same keys and
    values as the dictionary path (emit), whatever the event's fields hold."""
    from ftpcluster.worker.protocol import Event, EventName, SessionInfo
    from ftpcluster.worker.session_log import SessionLogger

    sink = _configured(tmp_path)
    logs._State.base = {"role": "node", "node": 7}
    logs._State.generation += 1
    sl = SessionLogger(7)
    info = SessionInfo("7-1-2", "192.0.2.\u00e9\"x", pending_user="bob\n")
    cases = [
        Event(EventName.CONNECT, {}),
        Event(EventName.LOGIN, {"user": "al\u00efce", "anonymous": False}),
        Event(EventName.TRANSFER, {"command": "RETR", "path": "/a \"b\"\\\u2603", "bytes": 1024, "seconds": 0.25,
                                   "ascii": False, "status": "ok", "direction": "o"}),
        Event(EventName.LOGIN_FAILED, {"user": "mallory", "attempt": 2}),
        Event(EventName.TRANSFER, {"event": "a field the line writes itself", "level": 3}),  # the dict path
    ]

    def expected(event: Event, user: str | None) -> dict[str, Any]:
        level, message = {"connect": ("info", "connect"), "login": ("info", "login ok"), "transfer": ("info", "transfer"),
                          "login_failed": ("warning", "login failed")}[event.name]  # fmt: skip
        fields = {"channel": "session", "node": 7, **event.fields, "session": info.session_id, "client": info.client_ip}
        if user is not None:
            fields["user"] = user
        fields["event"] = message
        fields.update({"role": "node", "level": level})
        return fields

    async def main() -> None:
        for i, ev in enumerate(cases):
            if i == 2:
                info.user, info.pending_user = "al\u00efce", None
            sl(ev, info)
        logs.flush()

    asyncio.run(main())
    lines = [json.loads(x) for x in "".join(sink.writes).splitlines()]
    assert len(lines) == len(cases)
    users = ["bob\n", "bob\n", "al\u00efce", "al\u00efce", "al\u00efce"]
    for got, ev, user in zip(lines, cases, users):
        assert got.pop("timestamp").endswith("Z")
        assert got == expected(ev, user), ev
