"""A bare TLS server process whose session cache is the shared-memory L1 through the
native hooks: two of them on one cache file show cross-process resumption.

    python -m tests.support_tls_native CACHE_FILE create|open CERT KEY [count]

Listens on a port of 127.0.0.1 the kernel picks (bound here and kept: no other
process can take it between a choice and the bind), prints "ready PORT", then
"reused <bool> <version>" per connection."""

from __future__ import annotations

import socket
import ssl
import sys
from pathlib import Path

from ftpcluster.cluster.shm_cache import ShmCache
from ftpcluster.worker.tls_native import install_session_cache


def main() -> None:
    path, mode, cert, key = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    count = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    cache = ShmCache(path, sets=64, create=mode == "create")

    class Backend:
        def lookup(self, sid: bytes) -> bytes | None:
            return cache.get(sid)

        def store(self, sid: bytes, der: bytes, ttl: float) -> None:
            cache.put(sid, der, ttl)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.3: stateful tickets, looked up through the cache
    install_session_cache(ctx, Backend(), 300, b"test", lambda e: print("error", e, flush=True))
    ls = socket.create_server(("127.0.0.1", 0))
    ls.settimeout(30)
    print("ready", ls.getsockname()[1], flush=True)
    for _ in range(count):
        c, _ = ls.accept()
        c.settimeout(10)
        try:
            s = ctx.wrap_socket(c, server_side=True)
            print("reused", s.session_reused, s.version(), flush=True)
            s.sendall(b"hello\n")
            try:
                s.recv(10)
            except OSError:
                pass
            s.close()
        except (OSError, ssl.SSLError) as e:
            print("error", e, flush=True)


if __name__ == "__main__":
    main()
