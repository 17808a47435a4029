"""The control channel's receive buffer: bytes in, complete command lines out.

Bounded like h11's buffer: a line longer than `max_line` is dropped (the caller
answers 500) and the rest of it is discarded up to the next LF, so a client
cannot make us buffer without limit."""

from __future__ import annotations

from dataclasses import dataclass

TOO_LONG = object()  # marker yielded in place of an over-long line


@dataclass
class LineBuffer:
    max_line: int = 4096
    _buf: bytearray | None = None
    _discarding: bool = False

    def __post_init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes | object]:
        """Return complete lines (without CR LF) and TOO_LONG markers."""
        out: list[bytes | object] = []
        buf = self._buf
        assert buf is not None
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if self._discarding:
                self._discarding = False
            elif nl - start > self.max_line:
                out.append(TOO_LONG)
            else:
                line = bytes(buf[start:nl])
                out.append(line[:-1] if line.endswith(b"\r") else line)
            start = nl + 1
        del buf[:start]
        if len(buf) > self.max_line:
            # Over-long line still arriving: report once, then drop until LF.
            if not self._discarding:
                out.append(TOO_LONG)
                self._discarding = True
            buf.clear()
        return out

    @property
    def pending(self) -> int:
        assert self._buf is not None
        return len(self._buf)
