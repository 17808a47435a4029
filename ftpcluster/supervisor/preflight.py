"""Checks the supervisor runs before it binds or forks, so a broken config fails
`start` (and `reload`) with one clear line instead of a crash loop of nodes.

`ftpcluster config check` runs the very same checks (`problems`), without
creating anything and, when root with `[server] user` set, as that account
would see the files: every message names the file and how to fix it."""

from __future__ import annotations

import grp
import os
import pwd
import ssl
from pathlib import Path

import structlog

from ..cluster.session_seal import SealError, load_sealer
from ..config import Config, ConfigError
from ..config import load as load_config
from ..limits import user_problems
from ..users import UserError, load_users


class StartupError(Exception):
    """Why the cluster cannot start (or reload) with this config."""


class Account:
    """Who will read the files: this process, or `[server] user` once start drops root."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        if name:
            pw = pwd.getpwnam(name)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            self.groups = set(os.getgrouplist(name, pw.pw_gid))
            self.group_name = grp.getgrgid(pw.pw_gid).gr_name
        else:
            self.uid, self.gid, self.groups, self.group_name = os.geteuid(), os.getegid(), set(os.getgroups()), ""

    def may(self, path: Path, bit: int) -> bool:
        """Whether this account may read (4), write (2) or search (1) `path`."""
        if not self.name:
            return os.access(path, {4: os.R_OK, 2: os.W_OK, 1: os.X_OK}[bit])
        if self.uid == 0:
            return True
        st = path.stat()
        shift = 6 if st.st_uid == self.uid else 3 if st.st_gid in self.groups else 0
        return bool((st.st_mode >> shift) & bit)

    def blocked_at(self, path: Path) -> Path | None:
        """The first folder above `path` this account cannot enter, if any."""
        try:
            return next((p for p in reversed(path.parents) if not self.may(p, 1)), None)
        except OSError:
            return path.parent

    def reads(self, path: Path) -> bool:
        """Readable, with every folder above it searchable."""
        try:
            return self.blocked_at(path) is None and self.may(path, 4)
        except OSError:
            return False


def service_account(cfg: Config) -> Account:
    """The account whose view counts: `[server] user` when we are root and would switch."""
    if cfg.server.user and os.geteuid() == 0:
        try:
            return Account(cfg.server.user)
        except KeyError:
            pass  # reported by problems()
    return Account()


def _readable(acct: Account, path: Path, what: str, fix: str) -> str | None:
    if not path.exists():
        return f"{what} {path}: not found ({fix})"
    if not acct.reads(path):
        who = f"the service user {acct.name}" if acct.name else "this user"
        folder = acct.blocked_at(path)
        if folder is not None:
            hint = f"the folder {folder} is closed to it: chmod o+x {folder}, or chgrp {acct.group_name or 'GROUP'} and g+x"
        elif acct.name:
            hint = f"chgrp {acct.group_name} {path}; chmod 0640 {path}"
        else:
            hint = f"check the permissions of {path}"
        return f"{what} {path}: not readable by {who} ({hint})"
    return None


def _writable(acct: Account, path: Path, what: str) -> str | None:
    """A log file the nodes open (append) as the service account: it, or the folder
    it will be made in, must be writable by that account."""
    if not path.parent.is_dir():
        return f"{what} {path}: the folder {path.parent} does not exist (create it for the service user)"
    target = path if path.exists() else path.parent
    try:
        ok = acct.blocked_at(path) is None and acct.may(target, 2)
    except OSError:
        ok = False
    if ok:
        return None
    who = f"the service user {acct.name}" if acct.name else "this user"
    fix = f"chown {acct.name} {target}" if acct.name else f"check the permissions of {target}"
    return f"{what} {path}: not writable by {who} ({fix}, or point it to a folder it can write)"


def problems(cfg: Config, create: bool = True) -> list[str]:
    """Every reason this config cannot start, one line each (empty = fine)."""
    out: list[str] = []
    if cfg.server.user and os.geteuid() == 0:
        try:
            pwd.getpwnam(cfg.server.user)
        except KeyError:
            out.append(f"[server] user: no such account {cfg.server.user!r} (create it: useradd --system {cfg.server.user})")
    acct = service_account(cfg)
    embedded = cfg.is_embedded  # `start` creates the embedded default's files
    state = cfg.state_dir
    fix_state = f"create it for the service user: install -d -o {cfg.server.user or 'USER'} {state}"
    if create:
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            out.append(f"[server] state_dir {state}: {e.strerror} ({fix_state})")
        else:
            if not os.access(state, os.W_OK):
                out.append(f"[server] state_dir {state}: not writable ({fix_state})")
    elif state.exists():
        chowned = bool(cfg.server.user) and os.geteuid() == 0  # start hands it to the user
        if not chowned and not (acct.may(state, 2) and acct.may(state, 1)):
            out.append(f"[server] state_dir {state}: not writable ({fix_state})")
    else:
        parent = next((p for p in state.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK | os.X_OK):
            out.append(f"[server] state_dir {state}: cannot be created in {parent} ({fix_state})")
    users = cfg.resolve(cfg.server.users_file)
    if users.exists():
        bad = _readable(acct, users, "[server] users_file", "")
        if bad:
            out.append(bad)
        else:
            try:
                out += user_problems(cfg, load_users(users))
            except (UserError, OSError, ValueError) as e:
                out.append(f"[server] users_file: bad users file {e}")
    for key, name in (("file", cfg.log.file), ("xferlog", cfg.log.xferlog)):
        bad = _writable(acct, cfg.resolve(name), f"[log] {key}") if name else None
        if bad:
            out.append(bad)
    if cfg.tls.enabled:
        out += _tls_problems(cfg, acct, embedded)
    tls_checked_key = cfg.tls.enabled and (cfg.tls.session_tickets == "cluster" or cfg.tls.session_cache == "memcache")
    if cfg.memcache.enabled and not tls_checked_key:  # what hosts share there carries a MAC under the key
        out += _key_problems(cfg, acct, embedded)
    return out


def _tls_problems(cfg: Config, acct: Account, embedded: bool) -> list[str]:
    out: list[str] = []
    cert, key = cfg.resolve(cfg.tls.certificate), cfg.resolve(cfg.tls.private_key)
    fix = f"for testing: ftpcluster cert generate --out {cert.parent}; or [tls] enabled = false"
    files = [(cert, "[tls] certificate"), (key, "[tls] private_key")]
    missing = [m for p, what in files if (m := _readable(acct, p, what, fix))]
    if missing and not (embedded and not cert.exists() and not key.exists()):
        out += missing
    elif not missing:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            out.append(f"[tls] certificate {cert} / private_key {key}: do not load ({e}); {fix}")
    if cfg.tls.session_tickets == "cluster" or cfg.tls.session_cache == "memcache":
        out += _key_problems(cfg, acct, embedded)
    return out


def _key_problems(cfg: Config, acct: Account, embedded: bool) -> list[str]:
    """The cluster key (`[tls] session_key_file`): TLS sessions and tickets, and the MACs
    of everything in memcached."""
    path = cfg.resolve(cfg.tls.session_key_file)
    gen = "ftpcluster key generate" + ("" if cfg.is_embedded else f" --config {cfg.path}")
    if embedded and not path.exists():
        return []
    bad = _readable(acct, path, "[tls] session_key_file", f"create it with: {gen}; the same file on every host")
    if bad:
        return [bad]
    try:
        load_sealer(path)
    except SealError as e:
        return [f"[tls] session_key_file: {e} (create a new one with: {gen})"]
    return []


def check(cfg: Config) -> None:
    """What `start` and `reload` call: the first problem, as a StartupError."""
    found = problems(cfg)
    if found:
        raise StartupError(found[0])



def reload_config(running: Config, notes: list[str] | None = None) -> Config:
    """The config file read again and checked, for a reload (raises StartupError).
    Listen addresses cannot move while the listeners stay open: they keep the
    running values until the next restart (with a warning, also added to `notes`
    for the operator's `reload` command)."""
    try:
        new = load_config(str(running.path) if running.path else None)
        check(new)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    if new.listen_address != running.listen_address or new.implicit_tls_address != running.implicit_tls_address:
        note = "listen addresses changed: they take effect at the next restart"
        structlog.get_logger("ftpcluster.supervisor").warning(note)
        if notes is not None:
            notes.append(note)
        new.server.listen, new.server.implicit_tls_listen = running.server.listen, running.server.implicit_tls_listen
    return new
