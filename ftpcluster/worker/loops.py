"""Event loop choice: uvloop where installed (it measured faster on our workloads,
see README), plain asyncio otherwise or when FTPCLUSTER_LOOP=asyncio."""

from __future__ import annotations

import asyncio
import os


def uvloop_wanted(explicit: bool | None = None) -> bool:
    if explicit is not None:
        return explicit
    return os.environ.get("FTPCLUSTER_LOOP", "auto") != "asyncio"


def new_event_loop(use_uvloop: bool | None = None) -> asyncio.AbstractEventLoop:
    if uvloop_wanted(use_uvloop):
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()
