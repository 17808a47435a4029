"""Checks the supervisor runs before it binds or forks, so a broken config fails
`start` (and `reload`) with one clear line instead of a crash loop of nodes."""

from __future__ import annotations

import os
import ssl

from ..config import Config
from ..users import UserError, load_users


class StartupError(Exception):
    """Why the cluster cannot start (or reload) with this config."""


def check(cfg: Config) -> None:
    state = cfg.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"state dir {state}: {e.strerror}") from None
    if not os.access(state, os.W_OK):
        raise StartupError(f"state dir {state} is not writable")
    try:
        load_users(cfg.resolve(cfg.server.users_file))
    except (UserError, OSError, ValueError) as e:
        raise StartupError(f"users file: {e}") from None
    if cfg.tls.enabled:
        cert, key = cfg.resolve(cfg.tls.certificate), cfg.resolve(cfg.tls.private_key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(cert, key)
        except FileNotFoundError as e:
            raise StartupError(f"TLS certificate or key not found: {e.filename}") from None
        except PermissionError as e:
            raise StartupError(f"TLS certificate or key unreadable: {e.filename}") from None
        except (ssl.SSLError, OSError) as e:
            raise StartupError(f"TLS certificate {cert} / key {key}: {e}") from None
        if cfg.tls.session_tickets == "cluster" or cfg.tls.session_cache == "memcache":
            from ..cluster.session_seal import SealError, load_sealer

            try:
                load_sealer(cfg.resolve(cfg.tls.session_key_file))
            except SealError as e:
                raise StartupError(f"{e} (create it with: ftpcluster key generate)") from None
