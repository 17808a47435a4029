"""Import every module a node may need before the supervisor forks or drops root.

Nodes then start faster (the code is shared copy-on-write), and after a switch
to `[server] user` nothing has to be read from places that account may not see
(a Python installed under /root, for one)."""

from __future__ import annotations

import importlib
import pkgutil

import ftpcluster

from ..worker.commands import load_handlers

# Imported lazily inside functions somewhere in the package.
_STDLIB_LAZY = ("ctypes", "errno", "calendar", "ssl", "hashlib", "hmac", "secrets", "json", "tomllib", "pwd", "grp",
                "encodings.idna")  # fmt: skip
# encodings.idna: the first getaddrinfo() of a str host imports it. When the cluster
# thread did that while the supervisor forked a node, the node inherited the module
# half-initialized, the codec lookup cached "unknown encoding: idna", and that node
# never reached memcached (LookupError on every connect, so no shared TLS sessions).
_OPTIONAL = ("uvloop",)


def preload() -> None:
    for name in _STDLIB_LAZY:
        importlib.import_module(name)
    for name in _OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for mod in pkgutil.walk_packages(ftpcluster.__path__, "ftpcluster."):
        if mod.name.endswith("__main__"):
            continue
        importlib.import_module(mod.name)
    load_handlers()
