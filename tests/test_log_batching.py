"""Log lines made during one event-loop iteration reach the file in one write, after
the iteration; lines from threads without a loop are written at once; the session
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


def test_one_write_per_loop_iteration(tmp_path: Path) -> None:
    sink = _configured(tmp_path)
    log = logs.get_logger("session", node=7)

    async def main() -> list[str]:
        for i in range(5):
            log.info("connect", n=i)
        logs.emit("info", {"channel": "session", "node": 7, "session": "s1", "event": "login ok"})
        log.debug("below the floor")
        before = list(sink.writes)
        await asyncio.sleep(0)
        return before

    before = asyncio.run(main())
    assert before == []  # nothing written inside the iteration
    assert len(sink.writes) == 1
    lines = [json.loads(x) for x in sink.writes[0].splitlines()]
    assert [x["event"] for x in lines] == ["connect"] * 5 + ["login ok"]
    for x in lines:
        assert x["channel"] == "session" and x["node"] == 7 and x["level"] == "info"
        assert x["timestamp"].endswith("Z") and len(x["timestamp"]) == len("2026-01-01T00:00:00.000000Z")
    # same field order from structlog's logger and from the session log's fast path
    assert list(lines[0]) == ["channel", "node", "n", "event", "level", "timestamp"]
    assert list(lines[-1]) == ["channel", "node", "session", "event", "level", "timestamp"]


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
