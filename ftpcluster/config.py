"""Configuration: TOML in, typed and validated sections out.

Keys and defaults are the external contract (docs/configuration.md, rendered
from config_doc.py); extra keys are ours.
Unknown keys are an error (a typo should not silently do nothing). Relative
paths resolve against the config file's folder (for the embedded default,
against ``./ftpcluster-data``)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .durations import DurationError, parse_duration
from .events import BAN_EVENTS
from .limits import LimitsError, check_limits

DEFAULT_DATA_DIR = "ftpcluster-data"
SEARCH_PATHS = ("./ftpcluster.toml", "/etc/ftpcluster/ftpcluster.toml")
LISTEN_BACKLOG = 1024  # of the FTP listeners (the supervisor binds them, a node may listen again)


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


def parse_hostport(text: str, what: str = "address") -> tuple[str, int]:
    """'127.0.0.1:21', '[::1]:21' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_s = rest.lstrip(":")
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{what}: expected host:port, got {text!r}")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{what}: bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port out of range in {text!r}")
    return host or "0.0.0.0", port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_port_range(text: str) -> tuple[int, int]:
    lo_s, sep, hi_s = str(text).partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s if sep else lo_s)
    except ValueError:
        raise ConfigError(f"server.passive_ports: expected 'LOW-HIGH', got {text!r}") from None
    if not (1024 <= lo <= hi <= 65535):
        raise ConfigError(f"server.passive_ports: need 1024 <= LOW <= HIGH <= 65535, got {text!r}")
    return lo, hi


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:2121"
    implicit_tls_listen: str = ""
    passive_ports: str = "30000-30999"
    masquerade_address: str = ""
    nodes: int = 2
    state_dir: str = "state"
    root: str = "ftproot"
    users_file: str = "users.toml"
    anonymous_root: str = ""
    max_login_attempts: int = 3
    idle_timeout: float = 600.0
    # ours
    login_timeout: float = 60.0
    data_timeout: float = 30.0
    no_transfer_timeout: float = 0.0  # logged in this long without a transfer: 421 (ProFTPD's TimeoutNoTransfer); 0 = off
    max_sessions_per_node: int = 2000
    max_passive_per_host: int = 64  # passive listeners one client address may hold open on a node; 0 = no limit
    max_line_length: int = 4096
    atomic_uploads: bool = True
    banner: str = "ftpcluster ready"
    user: str = ""  # drop privileges to this account after binding (when started as root)
    heartbeat_timeout: float = 30.0
    graceful_timeout: float = 30.0  # TERM/reload: how long transfers may finish before nodes are killed
    max_connections_per_host: int = 0  # 0 = unlimited
    max_clients_per_host: int = 0
    max_clients_per_user: int = 0
    max_hosts_per_user: int = 0


@dataclass
class TLSConfig:
    enabled: bool = True
    certificate: str = "cert.pem"
    private_key: str = "key.pem"
    required: str = "off"
    session_cache: str = "memcache"
    session_tickets: str = "cluster"
    session_key_file: str = "session.key"
    require_data_session_reuse: bool = True
    # ours
    session_context: str = ""  # "" = the memcache namespace
    handshake_timeout: float = 10.0
    max_handshakes_per_host: int = 32  # implicit-TLS handshakes in flight per client address on a node; 0 = no limit
    session_lifetime: float = 3600.0
    session_key_overlap: float = 86400.0  # a rotated-out cluster key is still accepted this long
    session_cache_size: int = 8192  # entries in the host's shared-memory cache (1 KB each)
    upload_close_notify: bool = True  # a TLS upload must end with the client's close_notify


@dataclass
class MemcacheConfig:
    enabled: bool = False
    servers: list[str] = field(default_factory=lambda: ["127.0.0.1:11211"])
    replicas: int = 1
    connect_failures: int = 3
    timeout: float = 0.25
    # ours
    namespace: str = "ftpcluster"
    probe_interval: float = 1.0
    sync_interval: float = 0.2


@dataclass
class BanConfig:
    enabled: bool = True
    cache: str = "memcache"
    message: str = "Banned: %r"
    rules: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"event": "MaxLoginAttempts", "threshold": 2, "window": "10m", "duration": "1h"}
        ]
    )
    # ours
    classes: dict[str, list[str]] = field(default_factory=dict)
    never: list[str] = field(default_factory=list)
    table_size: int = 65536


@dataclass
class ProxyProtocolConfig:
    enabled: bool = False
    trusted: list[str] = field(default_factory=lambda: ["127.0.0.1/32"])
    # ours
    timeout: float = 3.0
    passive: bool = False  # passive listeners also expect a PROXY header


@dataclass
class LogConfig:
    level: str = "info"
    format: str = "json"
    file: str = ""
    xferlog: str = ""
    trace: dict[str, str] = field(default_factory=dict)


@dataclass
class MetricsConfig:
    listen: str = ""


@dataclass
class LimitsConfig:
    """Sizes and rates are strings (512K, 1M, 2G; "0" = no limit), parsed by limits.py."""

    user_download_rate: str = "0"
    user_upload_rate: str = "0"
    max_upload_size: str = "0"
    # ours
    session_download_rate: str = "0"
    session_upload_rate: str = "0"
    host_download_rate: str = "0"
    host_upload_rate: str = "0"
    quota_bytes: str = "0"
    quota_files: int = 0
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    rate_slot: float = 0.1
    fallback_hosts: int = 0
    quota_rescan_interval: float = 600.0


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "tls": TLSConfig,
    "memcache": MemcacheConfig,
    "ban": BanConfig,
    "proxy_protocol": ProxyProtocolConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
    "limits": LimitsConfig,
}
_DURATIONS = {
    ("server", "idle_timeout"),
    ("server", "login_timeout"),
    ("server", "data_timeout"),
    ("server", "no_transfer_timeout"),
    ("server", "heartbeat_timeout"),
    ("server", "graceful_timeout"),
    ("tls", "handshake_timeout"),
    ("tls", "session_lifetime"),
    ("tls", "session_key_overlap"),
    ("memcache", "timeout"),
    ("memcache", "probe_interval"),
    ("memcache", "sync_interval"),
    ("proxy_protocol", "timeout"),
    ("limits", "rate_slot"),
    ("limits", "quota_rescan_interval"),
}
_CHOICES = {
    ("tls", "required"): ("off", "control", "data", "both"),
    ("tls", "session_cache"): ("off", "local", "memcache"),
    ("tls", "session_tickets"): ("off", "local", "cluster"),
    ("ban", "cache"): ("local", "memcache"),
    ("log", "format"): ("json", "console"),
    ("log", "level"): ("debug", "info", "warning", "error", "critical"),
}


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    memcache: MemcacheConfig = field(default_factory=MemcacheConfig)
    ban: BanConfig = field(default_factory=BanConfig)
    proxy_protocol: ProxyProtocolConfig = field(default_factory=ProxyProtocolConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    path: Path | None = None  # the file it came from; None = embedded default
    base_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR).resolve())

    # ---- derived values -------------------------------------------------
    def resolve(self, p: str) -> Path:
        """A configured path, relative to the config file's folder."""
        return (self.base_dir / os.path.expanduser(p)).resolve() if p else Path()

    @property
    def is_embedded(self) -> bool:
        return self.path is None

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.server.listen, "server.listen")

    @property
    def implicit_tls_address(self) -> tuple[str, int] | None:
        s = self.server.implicit_tls_listen
        return parse_hostport(s, "server.implicit_tls_listen") if s else None

    @property
    def passive_range(self) -> tuple[int, int]:
        return parse_port_range(self.server.passive_ports)

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.server.state_dir)

    @property
    def session_context(self) -> bytes:
        return (self.tls.session_context or self.memcache.namespace).encode()[:32]

    @property
    def ban_uses_memcache(self) -> bool:
        return self.memcache.enabled and self.ban.cache == "memcache"

    def as_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        out["_source"] = str(self.path) if self.path else "embedded default"
        return out


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"{section}.{key}"
    if (section, key) in _DURATIONS:
        try:
            return parse_duration(value)
        except DurationError as e:
            raise ConfigError(f"{where}: {e}") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative")
        return value
    if section == "limits" and isinstance(default, str) and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a size as a bare number of bytes
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if isinstance(default, dict) and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    choices = _CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}; got {value!r}")
    return value


def from_dict(data: dict[str, Any], path: Path | None = None) -> Config:
    cfg = Config(path=path)
    if path is not None:
        cfg.base_dir = path.resolve().parent
    for section, values in data.items():
        cls = _SECTIONS.get(section)
        if cls is None:
            raise ConfigError(f"unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        obj = getattr(cfg, section)
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown key {section}.{key}")
            setattr(obj, key, _coerce(section, key, value, getattr(obj, key)))
    if "format" not in data.get("log", {}) and not cfg.log.file and sys.stderr.isatty():
        cfg.log.format = "console"  # a person is watching: readable lines unless the file says otherwise
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks, so a bad config fails at `config check`, not at 3 a.m."""
    cfg.listen_address
    cfg.implicit_tls_address
    cfg.passive_range
    if cfg.server.nodes < 1:
        raise ConfigError("server.nodes: at least 1")
    if cfg.server.max_line_length < 512:
        raise ConfigError("server.max_line_length: at least 512")
    if cfg.server.masquerade_address:
        try:  # PASV carries four numbers: a name or an IPv6 address cannot go there
            ipaddress.IPv4Address(cfg.server.masquerade_address)
        except ValueError:
            raise ConfigError(f"server.masquerade_address: an IPv4 address is needed (PASV replies carry one), "
                              f"got {cfg.server.masquerade_address!r}") from None  # fmt: skip
    if cfg.memcache.replicas < 1:
        raise ConfigError("memcache.replicas: at least 1")
    for s in cfg.memcache.servers:
        parse_hostport(s, "memcache.servers")
    for net in [*cfg.proxy_protocol.trusted, *cfg.ban.never]:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"not a network: {net!r}") from None
    for name, nets in cfg.ban.classes.items():
        if not isinstance(nets, list):
            raise ConfigError(f"ban.classes.{name}: expected a list of networks")
        for net in nets:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"ban.classes.{name}: not a network: {net!r}") from None
    for i, rule in enumerate(cfg.ban.rules):
        if not isinstance(rule, dict) or "event" not in rule:
            raise ConfigError(f"ban.rules[{i}]: needs at least 'event'")
        if rule["event"] not in BAN_EVENTS:
            raise ConfigError(f"ban.rules[{i}].event: unknown event {rule['event']!r} (known: {', '.join(BAN_EVENTS)})")
        for k in ("window", "duration"):
            if k in rule:
                try:
                    parse_duration(rule[k])
                except DurationError as e:
                    raise ConfigError(f"ban.rules[{i}].{k}: {e}") from None
        t = rule.get("threshold", 1)
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ConfigError(f"ban.rules[{i}].threshold: a positive integer")
    if cfg.metrics.listen:
        parse_hostport(cfg.metrics.listen, "metrics.listen")
    try:
        check_limits(cfg.limits)
    except LimitsError as e:
        raise ConfigError(str(e)) from None


def find_config_file(explicit: str | None) -> Path | None:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ConfigError(f"config file not found: {explicit}")
        return p
    for candidate in SEARCH_PATHS:
        p = Path(candidate)
        if p.is_file():
            return p
    return None


def load(explicit: str | None = None) -> Config:
    """Load from --config, ./ftpcluster.toml, /etc/ftpcluster/ftpcluster.toml, or the embedded default."""
    path = find_config_file(explicit)
    if path is None:
        return from_dict({}, None)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return from_dict(data, path.resolve())
