"""First start with the embedded default: make `./ftpcluster-data` usable at once
(certificate, session key, a first user whose random password is printed once)."""

from __future__ import annotations

import sys

from .certs import generate_self_signed, generate_session_key
from .config import Config
from .users import add_user, load_users, random_password


def prepare(cfg: Config) -> None:
    """Create what the embedded default points at; a real config is left alone."""
    if not cfg.is_embedded:
        return
    cfg.base_dir.mkdir(parents=True, exist_ok=True)
    cfg.resolve(cfg.server.root).mkdir(parents=True, exist_ok=True)
    cert, key = cfg.resolve(cfg.tls.certificate), cfg.resolve(cfg.tls.private_key)
    if cfg.tls.enabled and not (cert.exists() and key.exists()):
        generate_self_signed(cert.parent)
    session_key = cfg.resolve(cfg.tls.session_key_file)
    if not session_key.exists():
        generate_session_key(session_key)
    users_file = cfg.resolve(cfg.server.users_file)
    if not load_users(users_file):
        password = random_password()
        home = cfg.resolve(cfg.server.root) / "ftp"
        add_user(users_file, "ftp", password, str(home))
        print(
            f"ftpcluster: created user 'ftp' with password {password} (shown once; home {home})",
            file=sys.stderr,
            flush=True,
        )
