"""Rate limits and upload guards on a data stream, for users that have them.

Users without any limit never meet this module: their transfers keep the plain
stream and its zero-copy paths. A limited transfer gets a `LimitedPlainStream`
(plain) or `LimitedStream` (TLS) wrapped around its stream by `Transfer.wrap`:
every send or receive first takes tokens from the buckets in force (session,
user across the cluster, host), in pieces as big as the buckets grant, so
sendfile still moves each granted piece without a copy. While a bucket makes
the transfer wait, the stream's `moved` count ticks, so the data_timeout
watchdog never takes a throttled transfer for a stalled one."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable, Protocol

from . import datastream as ds
from .datastream import PlainStream

MIN_PIECE = 4096
TICK = 0.25  # a waiting transfer shows progress this often (data_timeout is at least 1 s)


async def _wait(seconds: float, tick: Callable[[], None]) -> None:
    """Sleep, ticking the transfer's progress count along the way."""
    end = time.monotonic() + seconds
    while True:
        tick()
        left = end - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(TICK, left))


class Bucket(Protocol):
    async def take(self, want: int, tick: Callable[[], None]) -> int:
        """At least 1 and at most `want` bytes, waiting as long as needed."""
        ...

    def give_back(self, n: int) -> None: ...


class LocalBucket:
    """A classic token bucket in this process: session caps and the host's share."""

    def __init__(self, rate: int, burst_seconds: float) -> None:
        self.rate = max(1, rate)
        self.burst = max(MIN_PIECE, int(rate * burst_seconds))
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, want: int, tick: Callable[[], None]) -> int:
        while True:
            self._refill()
            if self.tokens >= 1:
                got = int(min(want, self.tokens))
                self.tokens -= got
                return max(1, got)
            need = min(want, max(MIN_PIECE, self.burst // 4))
            await _wait(max(0.001, (need - self.tokens) / self.rate), tick)

    def give_back(self, n: int) -> None:
        self.tokens = min(self.burst, self.tokens + n)


Lease = Callable[[str, int, int, int], Awaitable[int]]  # (name, slot, budget, want) -> granted


class ClusterBucket:
    """One user's rate in one direction, shared by every session on every host:
    this node's sessions of the user draw from tokens leased out of the current
    slot's cluster budget (cluster/rate_lease.py)."""

    def __init__(self, name: str, rate: int, slot_seconds: float, lease: Lease) -> None:
        self.name = name
        self.rate = rate
        self.slot_seconds = slot_seconds
        self.budget = max(1, int(rate * slot_seconds))
        self.piece = max(min(self.budget, 16384), self.budget // 4)
        self.lease = lease
        self.slot = -1
        self.tokens = 0
        self.exhausted = False
        self.lock = asyncio.Lock()
        self.users = 0  # transfers using it; the bucket is dropped at 0

    def _at(self) -> tuple[int, float]:
        now = time.time()
        slot = int(now / self.slot_seconds)
        if slot != self.slot:
            self.slot, self.tokens, self.exhausted = slot, 0, False  # unused tokens die with their slot
        return slot, now

    async def take(self, want: int, tick: Callable[[], None]) -> int:
        while True:
            slot, now = self._at()
            if self.tokens > 0:
                got = min(want, self.tokens)
                self.tokens -= got
                return got
            if self.exhausted:
                await _wait((slot + 1) * self.slot_seconds - now + 0.0005, tick)
                continue
            async with self.lock:
                slot, _ = self._at()
                if self.tokens > 0 or self.exhausted:
                    continue
                got = await self.lease(self.name, slot, self.budget, max(self.piece, min(want, self.budget)))
                if self._at()[0] != slot:
                    continue  # the slot ended while we asked
                if got > 0:
                    self.tokens += got
                else:
                    self.exhausted = True

    def give_back(self, n: int) -> None:
        if int(time.time() / self.slot_seconds) == self.slot:
            self.tokens += n


class UploadGuard(Protocol):
    async def received(self, n: int) -> None:
        """Called with each received piece before it is written; raises to refuse it."""
        ...

    async def eof(self) -> None:
        """The client finished sending; the file is about to be named."""
        ...

    def finished(self, moved: int) -> None:
        """The transfer is over (written, failed or aborted): settle the accounts."""
        ...


class Limiter:
    """What one transfer is subject to: buckets in order, an optional upload guard."""

    def __init__(self, buckets: list[Bucket], guard: UploadGuard | None, on_close: Callable[[int, int], None]) -> None:
        self.buckets = buckets
        self.guard = guard
        self.on_close = on_close  # (bytes moved, waits) for metrics
        self.waits = 0

    def tick(self) -> None:
        self.waits += 1

    async def take(self, want: int) -> int:
        got = want
        for i, b in enumerate(self.buckets):
            g = await b.take(got, self.tick)
            if g < got:
                for earlier in self.buckets[:i]:
                    earlier.give_back(got - g)
            got = g
        return got

    def give_back(self, n: int) -> None:
        if n > 0:
            for b in self.buckets:
                b.give_back(n)


class LimitedStream:
    """Any stream (TLS) with limits: pieces the buckets grant, guard before each write."""

    def __init__(self, inner: Any, limiter: Limiter) -> None:
        self.inner = inner
        self.sock = inner.sock
        self.limiter = limiter
        self._closed = False

    @property
    def moved(self) -> int:
        return int(self.inner.moved) + self.limiter.waits

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            g = await self.limiter.take(len(view))
            await self.inner.send_all(view[:g])
            view = view[g:]

    async def send_file(self, fd: int, offset: int, chunk: int) -> int:
        raise NotImplementedError("limited streams send through send_all")

    async def recv_into(self, buf: memoryview) -> int:
        lim = self.limiter
        g = await lim.take(len(buf))
        n = await self.inner.recv_into(buf[:g])
        lim.give_back(g - n)
        if lim.guard is not None:
            await (lim.guard.received(n) if n else lim.guard.eof())
        return n

    async def close(self, clean: bool = True) -> None:
        _finish(self, int(self.inner.moved))
        await self.inner.close(clean)


def _finish(stream: Any, moved: int) -> None:
    if stream._closed:
        return
    stream._closed = True
    lim = stream.limiter
    if lim.guard is not None:
        lim.guard.finished(moved)
    lim.on_close(moved, lim.waits)


class LimitedPlainStream(PlainStream):
    """A plain stream with limits that keeps sendfile: each granted piece goes out
    zero-copy, from a thread when it is big, like the unlimited path."""

    def __init__(self, inner: PlainStream, limiter: Limiter) -> None:
        self.limiter = limiter
        super().__init__(inner.sock, inner.loop)
        self._bytes = inner.moved
        self._closed = False

    @property  # type: ignore[override]
    def moved(self) -> int:
        return self._bytes + self.limiter.waits

    @moved.setter
    def moved(self, value: int) -> None:  # the inherited `self.moved += n` lands here
        self._bytes = value - self.limiter.waits

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            g = await self.limiter.take(len(view))
            await super().send_all(view[:g])
            view = view[g:]

    async def recv_into(self, buf: memoryview) -> int:
        lim = self.limiter
        g = await lim.take(len(buf))
        n = await super().recv_into(buf[:g])
        lim.give_back(g - n)
        if lim.guard is not None:
            await (lim.guard.received(n) if n else lim.guard.eof())
        return n

    async def receive_to_fd(self, fd: int) -> int | None:
        """Rates: every piece passes the buckets on the loop (None). A quota alone keeps
        the threaded splice: the guard sees each piece while it is still in the pipe."""
        guard = self.limiter.guard
        if self.limiter.buckets or guard is None:
            return None
        loop = self.loop

        def before_write(n: int) -> None:
            asyncio.run_coroutine_threadsafe(guard.received(n) if n else guard.eof(), loop).result(60)

        self.before_write = before_write
        return await super().receive_to_fd(fd)

    async def send_file(self, fd: int, offset: int, chunk: int) -> int:
        total = 0
        size = os.fstat(fd).st_size
        while offset < size:
            g = await self.limiter.take(size - offset)
            n = await self._send_range(fd, offset, g, chunk)
            self.limiter.give_back(g - n)
            if n == 0:
                break
            offset += n
            total += n
        return total

    async def _send_range(self, fd: int, offset: int, count: int, chunk: int) -> int:
        if count >= ds.THREAD_MIN and ds._threads_busy < ds.THREADS:
            ds._threads_busy += 1
            try:
                return await self._send_file_thread(fd, offset, count)
            finally:
                ds._threads_busy -= 1
        sent_total, out = 0, self.sock.fileno()
        while sent_total < count:
            try:
                sent = os.sendfile(out, fd, offset + sent_total, min(chunk, count - sent_total))
            except BlockingIOError:
                await self._writable()
                continue
            if sent == 0:
                break
            sent_total += sent
            self.moved += sent
            if sent_total < count:
                await self._writable()
        return sent_total


    async def close(self, clean: bool = True) -> None:
        _finish(self, self._bytes)
        await super().close(clean)


def wrap_stream(stream: Any, limiter: Limiter) -> Any:
    if type(stream) is PlainStream:
        return LimitedPlainStream(stream, limiter)
    return LimitedStream(stream, limiter)
