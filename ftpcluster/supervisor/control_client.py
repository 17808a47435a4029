"""The CLI side of the control socket: one JSON request line, one JSON reply line."""

from __future__ import annotations

import errno
import json
import socket
import time
from typing import Any

from ..config import Config

MAX_REPLY = 16 * 1024 * 1024


class ControlError(Exception):
    """The supervisor could not be reached or gave no usable answer."""


def socket_path(cfg: Config) -> str:
    return str(cfg.state_dir / "control.sock")


def _connect(s: socket.socket, path: str, deadline: float) -> None:
    """A full backlog (a busy supervisor, or one that paused accepting on EMFILE)
    answers EAGAIN at once on a Unix socket: retried until the deadline."""
    pause = 0.005
    while True:
        try:
            s.connect(path)
            return
        except BlockingIOError as e:
            if e.errno != errno.EAGAIN or time.monotonic() + pause > deadline:
                raise socket.timeout from None
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


def call(cfg: Config, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    path = socket_path(cfg)
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            _connect(s, path, deadline)
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise ControlError("reply from the supervisor is too large")
    except FileNotFoundError:
        raise ControlError(f"no supervisor running (no control socket at {path})") from None
    except ConnectionRefusedError:
        raise ControlError(f"no supervisor running (stale control socket at {path})") from None
    except PermissionError:
        raise ControlError(f"permission denied on control socket {path}") from None
    except socket.timeout:
        raise ControlError(f"the supervisor did not answer within {timeout:g}s") from None
    except OSError as e:
        raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    if not buf:
        raise ControlError("the supervisor closed the control connection without an answer")
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError("unreadable reply from the supervisor") from None
    if not isinstance(reply, dict):
        raise ControlError("unreadable reply from the supervisor")
    if reply.get("ok") is False and "error" in reply and request.get("cmd") in ("status", "stop"):
        raise ControlError(str(reply["error"]))
    return reply
