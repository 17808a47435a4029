"""Numbers in command arguments, ASCII digits only.

`str.isdigit()` and `int()` accept any Unicode digit ('²', '٣', full-width '５'):
`isdigit()` says yes to '²' and `int()` then raises, and `int('٣')` quietly
reads 3. A command argument is an ASCII protocol field, so only 0-9 count."""

from __future__ import annotations

_ASCII_DIGITS = frozenset("0123456789")


def is_ascii_number(text: str) -> bool:
    """True for a non-empty run of ASCII digits 0-9, nothing else (no sign, no space)."""
    return bool(text) and all(c in _ASCII_DIGITS for c in text)


def ascii_int(text: str, max_digits: int = 19) -> int | None:
    """The value of `text` when it is 1..max_digits ASCII digits, else None."""
    if len(text) > max_digits or not is_ascii_number(text):
        return None
    return int(text)
