"""Session events to structured log lines, each carrying the session id, node id,
the client's real address (behind a proxy too) and the user once known.

Auth failures and bans carry both the address and the user name, so fail2ban
style tools and humans can see who tried what from where."""

from __future__ import annotations

from typing import Any

from ..logs import LineTemplate, emit, enabled, encode_json, encode_str, get_logger
from .protocol import Event, EventName, SessionInfo

# event name -> (level, message); anything not listed is only traced on the "session" channel
_LEVELS: dict[str, tuple[str, str]] = {  # EventName members: equal to their strings
    EventName.CONNECT: ("info", "connect"),
    EventName.DISCONNECT: ("info", "disconnect"),
    EventName.LOGIN: ("info", "login ok"),
    EventName.LOGIN_FAILED: ("warning", "login failed"),
    EventName.MAX_LOGIN_ATTEMPTS: ("warning", "too many failed logins"),
    EventName.TRANSFER: ("info", "transfer"),
    EventName.DELETE: ("info", "delete"),
    EventName.RENAME: ("info", "rename"),
    EventName.TLS_FAILED: ("info", "TLS handshake failed"),
    EventName.TIMEOUT_IDLE: ("info", "idle timeout"),
    EventName.TIMEOUT_NO_TRANSFER: ("info", "no transfer timeout"),
    EventName.TIMEOUT_LOGIN: ("info", "login timeout"),
    EventName.BAD_PROTOCOL: ("warning", "bad protocol"),
    EventName.EMPTY_PASSWORD: ("warning", "empty password"),
    EventName.ROOT_LOGIN: ("warning", "root login attempt"),
    EventName.BANNED: ("warning", "session ended by ban"),
    EventName.PASSIVE_EXHAUSTED: ("warning", "passive port range exhausted"),
    EventName.HANDLER_ERROR: ("error", "command handler failed"),
}


# Keys a line composes itself (SessionLogger._compose); an event field of the same name
# (other than user, which the session's user overrides as in the dict path) goes the dict way.
_COMPOSED = frozenset({"channel", "node", "session", "client", "user", "event", "level", "timestamp"})


_HEALTH_CHECK_QUIET = frozenset({EventName.CONNECT, EventName.DISCONNECT})


class SessionLogger:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self._templates: dict[tuple[str, str], LineTemplate] = {}
        self.log = get_logger("session", node=node_id)
        self.cmdlog = get_logger("command", node=node_id)

    @property
    def events(self) -> frozenset[str]:
        """What it hears (protocol.hears): the events its levels let through now."""
        out = {name for name, (level, _) in _LEVELS.items() if enabled("session", level)}
        if enabled("session", "debug"):
            return frozenset(EventName)  # the rest are traced at debug
        if enabled("command"):
            out.add(EventName.COMMAND)
        return frozenset(out)

    def __call__(self, event: Event, info: SessionInfo | None) -> None:
        if event.name == EventName.COMMAND:
            if enabled("command"):
                self.cmdlog.debug("command", **self.context(info), verb=event.fields.get("verb"))
            return
        spec = _LEVELS.get(event.name)
        level, message = spec if spec is not None else ("debug", str(event.name))
        if info is not None and info.health_check and event.name in _HEALTH_CHECK_QUIET:
            level = "debug"  # a balancer checks every second or so: not worth a line each
        if not enabled("session", level):
            return  # below the level: skip building the record (a hot path at warning)
        if info is not None and self._compose(level, message, event.fields, info):
            return
        # The record as self.log.<level>(message, **fields) builds it, without
        # structlog's bound-logger round trip (three of these per session at info).
        fields = {"channel": "session", "node": self.node_id, **event.fields}
        if info is not None:
            fields.update(self.context(info))
        fields["event"] = message
        emit(level, fields)

    def _compose(self, level: str, message: str, fields: dict[str, Any], info: SessionInfo) -> bool:
        """The line as a string (LineTemplate): the session's part made once per session
        (`info.log_head`), the event's fields encoded alone. False: take the dict path."""
        t = self._templates.get((level, message))
        if t is None or not t.current:
            t = self._templates[(level, message)] = LineTemplate(level, message, _COMPOSED)
            if not t.current:
                return False  # console format
        user = info.user if info.user is not None else info.pending_user
        if fields:
            if "user" in fields:
                if user is None:
                    user = fields["user"]
                fields = {k: v for k, v in fields.items() if k != "user"}
            if not fields.keys().isdisjoint(_COMPOSED) or not isinstance(user, (str, type(None))):
                return False
        head = info.log_head
        if not head:
            head = info.log_head = (f'{{"channel": "session", "node": {self.node_id}, '
                                    f'"session": {encode_str(info.session_id)}, "client": {encode_str(info.client_ip)}')  # fmt: skip
        if fields:
            head = f"{head}, {encode_json(fields)[1:-1]}"
        if user is not None:
            head = f'{head}, "user": {encode_str(user)}'
        t.write(head)
        return True

    @staticmethod
    def context(info: SessionInfo | None) -> dict[str, Any]:
        if info is None:
            return {}
        ctx: dict[str, Any] = {"session": info.session_id, "client": info.client_ip}
        user = info.user if info.user is not None else info.pending_user
        if user is not None:
            ctx["user"] = user
        return ctx
