"""Session events to structured log lines, each carrying the session id, node id,
the client's real address (behind a proxy too) and the user once known.

Auth failures and bans carry both the address and the user name, so fail2ban
style tools and humans can see who tried what from where."""

from __future__ import annotations

from typing import Any

from ..logs import emit, enabled, get_logger
from .protocol import Event, EventName, SessionInfo

# event name -> (level, message); anything not listed is only traced on the "session" channel
_LEVELS: dict[str, tuple[str, str]] = {
    "connect": ("info", "connect"),
    "disconnect": ("info", "disconnect"),
    "login": ("info", "login ok"),
    "login_failed": ("warning", "login failed"),
    "MaxLoginAttempts": ("warning", "too many failed logins"),
    "transfer": ("info", "transfer"),
    "delete": ("info", "delete"),
    "rename": ("info", "rename"),
    "tls_failed": ("info", "TLS handshake failed"),
    "TimeoutIdle": ("info", "idle timeout"),
    "TimeoutNoTransfer": ("info", "no transfer timeout"),
    "TimeoutLogin": ("info", "login timeout"),
    "BadProtocol": ("warning", "bad protocol"),
    "EmptyPassword": ("warning", "empty password"),
    "RootLogin": ("warning", "root login attempt"),
    "banned": ("warning", "session ended by ban"),
    "passive_exhausted": ("warning", "passive port range exhausted"),
    "handler_error": ("error", "command handler failed"),
}


class SessionLogger:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.log = get_logger("session", node=node_id)
        self.cmdlog = get_logger("command", node=node_id)

    def __call__(self, event: Event, info: SessionInfo | None) -> None:
        if event.name == EventName.COMMAND:
            if enabled("command"):
                self.cmdlog.debug("command", **self.context(info), verb=event.fields.get("verb"))
            return
        spec = _LEVELS.get(str(event.name))
        level, message = spec if spec is not None else ("debug", str(event.name))
        if not enabled("session", level):
            return  # below the level: skip building the record (a hot path at warning)
        # The record as self.log.<level>(message, **fields) builds it, without
        # structlog's bound-logger round trip (three of these per session at info).
        fields = {"channel": "session", "node": self.node_id, **event.fields}
        if info is not None:
            fields.update(self.context(info))
        fields["event"] = message
        emit(level, fields)

    @staticmethod
    def context(info: SessionInfo | None) -> dict[str, Any]:
        if info is None:
            return {}
        ctx: dict[str, Any] = {"session": info.session_id, "client": info.client_ip}
        user = info.user if info.user is not None else info.pending_user
        if user is not None:
            ctx["user"] = user
        return ctx
