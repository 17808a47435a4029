"""A logged-in user as the session core sees it (the I/O layer builds it from the
user database after a password check)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class User:
    name: str
    home: str
    read_only: bool = False
    anonymous: bool = False
