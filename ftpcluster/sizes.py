"""Sizes and rates as operators write them: ``512K``, ``1M``, ``2G``, ``1.5M``, a
bare number of bytes; ``"0"`` means no limit. Powers of 1024, as in ProFTPD's
MaxStoreFileSize and vsftpd's local_max_rate documentation."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40}  # fmt: skip
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$")


class SizeError(ValueError):
    """A size string that cannot be understood."""


def parse_size(text: str | int) -> int:
    """Bytes (or bytes per second for a rate); 0 = no limit. Negative values are refused."""
    if isinstance(text, bool):
        raise SizeError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"negative size: {text!r}")
        return text
    m = _SIZE.match(str(text).strip().lower())
    if not m or m.group(2) not in _UNITS:
        raise SizeError(f"not a size: {text!r} (use 512K, 1M, 2G or a number of bytes; \"0\" = no limit)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_size(n: int) -> str:
    """Short human form (1M, 512K, 1500) for status and SITE QUOTA."""
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
