"""`ftpcluster start`: checks, binding the listeners, dropping privileges and, with
--daemon, detaching; then the arbiter runs. A detached start waits until every node
accepts (or the supervisor says why it failed) before the command returns."""

from __future__ import annotations

import sys

from ..bootstrap import prepare
from ..config import Config
from ..logs import configure
from .arbiter import BOOT_TIMEOUT, PIDFILE, Arbiter
from .daemon import daemonize, wait_ready
from .fd_limit import raise_fd_limit
from .instance_lock import AlreadyRunning, hold
from .listeners import BindError, bind_all
from .preflight import StartupError, check
from .preload import preload
from .privileges import PrivilegeError, drop_privileges


def start(cfg: Config, daemon: bool = False) -> int:
    configure(cfg.log, cfg.base_dir, role="supervisor")
    prepare(cfg)
    preload()
    raise_fd_limit(cfg)  # before binding and forking: the nodes inherit it
    try:
        check(cfg)
        hold(cfg.state_dir, cfg.state_dir / PIDFILE)  # before binding: "already running", not "address in use"
        listeners = bind_all(cfg)
        if drop_privileges(cfg):
            check(cfg)  # again as the service account: the nodes read these files as it
    except (StartupError, BindError, PrivilegeError, AlreadyRunning) as e:
        print(f"ftpcluster: {e}", file=sys.stderr)
        return 1
    ready_fd = None
    if daemon:
        parent_r, ready_fd = daemonize()
        if parent_r is not None:
            ok, why = wait_ready(parent_r, BOOT_TIMEOUT + 30)
            if not ok:
                print(f"ftpcluster: start failed: {why}", file=sys.stderr)
                return 1
            return 0
        configure(cfg.log, cfg.base_dir, role="supervisor")  # stderr is /dev/null now
    return Arbiter(cfg, listeners, ready_fd).run()
