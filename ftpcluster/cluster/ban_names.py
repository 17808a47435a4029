"""Validation of what an operator types after `ftpcluster ban|permit KIND NAME`.

Normalises so that the same ban is always stored under the same name
(``10.0.0.1/32`` is ``10.0.0.1``; IPv6 in compressed form)."""

from __future__ import annotations

import ipaddress

from ..config import Config

_USER_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class BanNameError(ValueError):
    """The name cannot be banned as given; the message says why."""


def normalize_host(name: str) -> str:
    """An address or a network in CIDR form."""
    try:
        if "/" in name:
            net = ipaddress.ip_network(name, strict=False)
            if net.num_addresses == 1:
                return str(net.network_address)
            return str(net)
        return str(ipaddress.ip_address(name))
    except ValueError:
        raise BanNameError(f"not an IP address or network: {name!r}") from None


def _check_user(name: str) -> None:
    if not name or len(name) > 64 or not set(name) <= _USER_CHARS:
        raise BanNameError(f"not a valid user name: {name!r}")


def validate_ban_name(kind: str, name: str, cfg: "Config | None" = None) -> str:
    """Return the normalised name, or raise BanNameError."""
    name = name.strip()
    if kind == "host":
        return normalize_host(name)
    if kind == "user":
        if "@" in name:  # user@host
            user, _, host = name.rpartition("@")
            _check_user(user)
            return f"{user}@{normalize_host(host)}"
        _check_user(name)
        return name
    if kind == "class":
        if cfg is not None and name not in cfg.ban.classes:
            known = ", ".join(sorted(cfg.ban.classes)) or "none configured"
            raise BanNameError(f"unknown class {name!r} (classes: {known}; define them under [ban.classes])")
        return name
    raise BanNameError(f"unknown ban kind {kind!r}: use host, user or class")
