"""The names of session events, in one place: the session core emits them, the
`[ban]` rules of the config name some of them, metrics and logs count them.

One `StrEnum` in the bottom layer (config.py and cluster/ may import it, and
worker/protocol.py re-exports it for the session side). A member equals its
value as a string, so an event still emitted as a plain string matches too.
The names a `[ban]` rule may use are ProFTPD mod_ban's BanOnEvent names, kept
as ProFTPD spells them because users copy them from its documentation; the
other events are internal (logs, metrics) and never appear in a config."""

from __future__ import annotations

from enum import StrEnum


class EventName(StrEnum):
    # ---- internal: session lifecycle, commands, transfers, TLS
    CONNECT = "connect"
    CONNECT_FAILED = "connect_failed"
    DISCONNECT = "disconnect"
    COMMAND = "command"
    HANDLER_ERROR = "handler_error"
    USER = "user"
    LOGIN = "login"
    LOGIN_FAILED = "login_failed"
    LOGIN_REFUSED = "login_refused"
    TRANSFER = "transfer"
    DELETE = "delete"
    RENAME = "rename"
    TLS_ESTABLISHED = "tls_established"
    TLS_FAILED = "tls_failed"
    PASSIVE_LIMIT = "passive_limit"
    PASSIVE_EXHAUSTED = "passive_exhausted"
    BANNED = "banned"
    # ---- config-facing: ProFTPD mod_ban BanOnEvent names (what `[ban] rules` name)
    MAX_LOGIN_ATTEMPTS = "MaxLoginAttempts"
    MAX_LOGIN_ATTEMPTS_FROM_USER = "MaxLoginAttemptsFromUser"
    LOGIN_RATE = "LoginRate"
    CLIENT_CONNECT_RATE = "ClientConnectRate"
    MAX_CONNECTIONS_PER_HOST = "MaxConnectionsPerHost"
    MAX_CLIENTS_PER_HOST = "MaxClientsPerHost"
    MAX_CLIENTS_PER_USER = "MaxClientsPerUser"
    MAX_HOSTS_PER_USER = "MaxHostsPerUser"
    TIMEOUT_IDLE = "TimeoutIdle"
    TIMEOUT_LOGIN = "TimeoutLogin"
    TIMEOUT_NO_TRANSFER = "TimeoutNoTransfer"
    UNHANDLED_COMMAND = "UnhandledCommand"
    BAD_PROTOCOL = "BadProtocol"
    EMPTY_PASSWORD = "EmptyPassword"
    ROOT_LOGIN = "RootLogin"
    TLS_HANDSHAKE = "TLSHandshake"


# The events a `[ban]` rule may name (config validation, the ban-event metric's labels).
BAN_EVENTS: tuple[EventName, ...] = tuple(e for e in EventName if e.value[0].isupper())
