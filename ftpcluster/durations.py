"""Durations as operators write them: ``30s``, ``10m``, ``2h``, ``1d``, ``250ms`` or
ProFTPD's ``hh:mm:ss``. One parser so the CLI and the config agree."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SUFFIXED = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)?$")
_CLOCK = re.compile(r"^(\d+):([0-5]?\d):([0-5]?\d)$")


class DurationError(ValueError):
    """A duration string that cannot be understood."""


def parse_duration(text: str | int | float) -> float:
    """Return seconds. Bare numbers are seconds; negative values are refused."""
    if isinstance(text, bool):
        raise DurationError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise DurationError(f"negative duration: {text!r}")
        return float(text)
    s = str(text).strip().lower()
    m = _CLOCK.match(s)
    if m:
        h, mi, se = (int(g) for g in m.groups())
        return float(h * 3600 + mi * 60 + se)
    m = _SUFFIXED.match(s)
    if not m:
        raise DurationError(f"not a duration: {text!r} (use 30s, 10m, 2h, 1d or hh:mm:ss)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """Short human form, for status output."""
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
