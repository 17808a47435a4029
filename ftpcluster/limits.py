"""Which transfer limits apply to a user: `[limits]`, then the user's class
(`[limits] classes`), then the user's own fields in the users file, the most
specific winning ("0" there lifts a limit set above it).

Rates are bytes/s: `user_*_rate` is shared by all of a user's sessions on every
host (cluster token bucket, worker/throttle.py), `session_*_rate` caps one
session, `host_*_rate` caps everything one host moves in that direction.
Quotas (bytes and files under the home) and `max_upload_size` (per file,
ProFTPD's MaxStoreFileSize) are checked on STOR/APPE/STOU with 552."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .sizes import SizeError, format_size, parse_size

if TYPE_CHECKING:
    from .config import Config, LimitsConfig
    from .users import UserRecord

# Keys a class may set (the [limits] names) and the users-file field for each.
CLASS_KEYS = ("user_download_rate", "user_upload_rate", "session_download_rate", "session_upload_rate",
              "max_upload_size", "quota_bytes", "quota_files")  # fmt: skip
USER_FIELDS = {"download_rate": "user_download_rate", "upload_rate": "user_upload_rate",
               "max_upload_size": "max_upload_size", "quota_bytes": "quota_bytes", "quota_files": "quota_files"}  # fmt: skip


class LimitsError(ValueError):
    """A limit that cannot be understood; the message names it."""


@dataclass(frozen=True, slots=True)
class UserLimits:
    download_rate: int = 0  # bytes/s over every session of the user, cluster-wide
    upload_rate: int = 0
    session_download_rate: int = 0
    session_upload_rate: int = 0
    max_upload_size: int = 0
    quota_bytes: int = 0
    quota_files: int = 0

    @property
    def has_quota(self) -> bool:
        return bool(self.quota_bytes or self.quota_files)

    def rates(self, direction: str) -> tuple[int, int]:
        """(user rate, session rate) for "in" (uploads) or "out" (downloads)."""
        if direction == "in":
            return self.upload_rate, self.session_upload_rate
        return self.download_rate, self.session_download_rate


NONE = UserLimits()


def _value(key: str, raw: Any, where: str) -> int:
    if key == "quota_files":
        if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).isdigit():
            raise LimitsError(f"{where}: expected a number of files, got {raw!r}")
        return int(raw)
    try:
        return parse_size(raw)
    except SizeError as e:
        raise LimitsError(f"{where}: {e}") from None


def _apply(base: dict[str, int], overrides: dict[str, Any], where: str) -> None:
    for key, raw in overrides.items():
        if key not in CLASS_KEYS:
            raise LimitsError(f"{where}: unknown limit {key!r} (known: {', '.join(CLASS_KEYS)})")
        base[key] = _value(key, raw, f"{where}.{key}")


def _defaults(lc: LimitsConfig) -> dict[str, int]:
    return {k: _value(k, getattr(lc, k), f"limits.{k}") for k in CLASS_KEYS}


def check_limits(lc: LimitsConfig) -> None:
    """Parse everything once, so `config check` names a bad value."""
    _defaults(lc)
    for k in ("host_download_rate", "host_upload_rate"):
        _value(k, getattr(lc, k), f"limits.{k}")
    for name, values in lc.classes.items():
        if not isinstance(values, dict):
            raise LimitsError(f"limits.classes.{name}: expected a table of limits")
        _apply({}, values, f"limits.classes.{name}")
    if lc.rate_slot < 0.01 or lc.rate_slot > 10:
        raise LimitsError("limits.rate_slot: between 10ms and 10s")


def limits_for(cfg: Config, rec: UserRecord | None) -> UserLimits:
    """The limits in force for one user (None: anonymous, gets the defaults)."""
    lc = cfg.limits
    values = _defaults(lc)
    if rec is not None:
        cls = getattr(rec, "user_class", "")
        if cls and cls in lc.classes:
            _apply(values, lc.classes[cls], f"limits.classes.{cls}")
        for field_name, raw in getattr(rec, "limits", ()):
            key = USER_FIELDS[field_name]
            values[key] = _value(key, raw, f"user {rec.name}: {field_name}")
    return UserLimits(
        download_rate=values["user_download_rate"], upload_rate=values["user_upload_rate"],
        session_download_rate=values["session_download_rate"], session_upload_rate=values["session_upload_rate"],
        max_upload_size=values["max_upload_size"], quota_bytes=values["quota_bytes"], quota_files=values["quota_files"],
    )  # fmt: skip


def user_problems(cfg: Config, users: dict[str, Any]) -> list[str]:
    """A user's limits that cannot be read or a class that does not exist, one line
    each (`config check` and `start`; a running node then applies the defaults)."""
    out = []
    for rec in users.values():
        cls = getattr(rec, "user_class", "")
        if cls and cls not in cfg.limits.classes:
            out.append(f"[server] users_file: user {rec.name}: no class {cls!r} in [limits] classes")
        try:
            limits_for(cfg, rec)
        except LimitsError as e:
            out.append(f"[server] users_file: {e}")
    return out


def host_rates(cfg: Config) -> tuple[int, int]:
    """(download, upload) caps for this whole host; 0 = none."""
    lc = cfg.limits
    return parse_size(lc.host_download_rate), parse_size(lc.host_upload_rate)


def any_configured(cfg: Config) -> bool:
    """False when no limit of any kind can apply: the node then installs nothing."""
    if any(_defaults(cfg.limits).values()) or any(host_rates(cfg)) or cfg.limits.classes:
        return True
    return False


def summary(cfg: Config) -> dict[str, Any]:
    """The limits in force, for `status --json` (bytes and bytes/s; 0 = none)."""
    d = _defaults(cfg.limits)
    down, up = host_rates(cfg)
    classes = {}
    for name, values in cfg.limits.classes.items():
        got: dict[str, int] = {}
        _apply(got, values, f"limits.classes.{name}")
        classes[name] = got
    return {"limits": {**d, "host_download_rate": down, "host_upload_rate": up, "classes": classes,
                       "rate_slot": cfg.limits.rate_slot}}  # fmt: skip


def describe_summary(lim: dict[str, Any]) -> str:
    """One line of `ftpcluster status`: the limits in force ("none" when there are none)."""
    parts = []
    for key, label in (("user_download_rate", "user down"), ("user_upload_rate", "user up"),
                       ("session_download_rate", "session down"), ("session_upload_rate", "session up"),
                       ("host_download_rate", "host down"), ("host_upload_rate", "host up")):  # fmt: skip
        if lim.get(key):
            parts.append(f"{label} {format_size(int(lim[key]))}/s")
    for key, label in (("max_upload_size", "max upload"), ("quota_bytes", "quota")):
        if lim.get(key):
            parts.append(f"{label} {format_size(int(lim[key]))}")
    if lim.get("quota_files"):
        parts.append(f"quota {lim['quota_files']} files")
    if lim.get("classes"):
        parts.append("classes " + ", ".join(sorted(lim["classes"])))
    return ", ".join(parts) or "none (users may have their own: `ftpcluster quota show USER`)"
