"""Started as root (without systemd's User=): bind first, then become `[server] user`.

The listeners on ports 21/990 stay open across the switch; the state dir is
handed to the user so the control socket and shared tables stay writable."""

from __future__ import annotations

import os
import pwd

from ..config import Config


class PrivilegeError(Exception):
    """The configured account cannot be switched to."""


def drop_privileges(cfg: Config) -> bool:
    """Switch to `[server] user` when root; True when it switched."""
    name = cfg.server.user
    if not name or os.geteuid() != 0:
        return False
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"server.user: no such account {name!r}") from None
    state = cfg.state_dir
    state.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(state):
        for n in [root, *(os.path.join(root, f) for f in dirs + files)]:
            os.chown(n, pw.pw_uid, pw.pw_gid)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PrivilegeError("could not drop root privileges")
    os.environ["HOME"] = pw.pw_dir
    return True
