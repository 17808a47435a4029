"""The control channel's receive buffer: bytes in, complete command lines out.

Bounded like h11's buffer: a line longer than `max_line` is dropped (the caller
answers 500) and the rest of it is discarded up to the next LF, so a client
cannot make us buffer without limit. Lines are taken one at a time
(`next_line`), so a session that is busy can leave a pipelined burst unsplit
here while the connection stops reading (back-pressure) instead of queueing it."""

from __future__ import annotations

from dataclasses import dataclass, field

TOO_LONG = object()  # marker yielded in place of an over-long line


@dataclass
class LineBuffer:
    max_line: int = 4096
    _buf: bytearray = field(default_factory=bytearray)
    _start: int = 0  # bytes before this offset were already taken
    _discarding: bool = False

    def append(self, data: bytes) -> None:
        if self._start:
            del self._buf[: self._start]
            self._start = 0
        self._buf += data

    def next_line(self) -> bytes | object | None:
        """One line (without CR LF), TOO_LONG, or None when no complete line is buffered."""
        buf = self._buf
        while True:
            start = self._start
            nl = buf.find(b"\n", start)
            if nl < 0:
                if len(buf) - start > self.max_line:
                    # Over-long line still arriving: report once, then drop until LF.
                    buf.clear()
                    self._start = 0
                    if not self._discarding:
                        self._discarding = True
                        return TOO_LONG
                return None
            self._start = nl + 1
            if self._discarding:
                self._discarding = False
                continue
            if nl - start > self.max_line:
                return TOO_LONG
            end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
            return bytes(buf[start:end])

    def feed(self, data: bytes) -> list[bytes | object]:
        """Append `data` and return every complete line (and TOO_LONG marker)."""
        self.append(data)
        out: list[bytes | object] = []
        while (line := self.next_line()) is not None:
            out.append(line)
        return out

    @property
    def idle(self) -> bool:
        """Nothing buffered, nothing being discarded: the next read starts a line."""
        return self._start == len(self._buf) and not self._discarding

    def peek(self, n: int) -> bytes:
        """The first `n` bytes buffered and not yet taken (what follows the last line)."""
        return bytes(self._buf[self._start : self._start + n])

    @property
    def pending(self) -> int:
        """Bytes buffered and not yet taken as lines."""
        return len(self._buf) - self._start
