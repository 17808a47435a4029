"""A bare TLS server process with cluster ticket keys derived from SECRET.

    python -m tests.support_tls_tickets SECRET CERT KEY

Listens on a port of 127.0.0.1 the kernel picks (bound here and kept) and prints
"ready PORT"."""

from __future__ import annotations

import hashlib
import socket
import ssl
import sys

from ftpcluster.worker.tls_tickets import install_ticket_keys


def main() -> None:
    secret, cert, key = sys.argv[1].encode(), sys.argv[2], sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tk = install_ticket_keys(ctx, lambda e: hashlib.shake_256(secret + str(e).encode()).digest(80), 3600,
                             lambda e: print("error", e, flush=True))  # fmt: skip
    ls = socket.create_server(("127.0.0.1", 0))
    ls.settimeout(30)
    print("ready", ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    c.settimeout(10)
    s = ctx.wrap_socket(c, server_side=True)
    print("reused", s.session_reused, s.version(), "issued", tk.issued, "resumed", tk.resumed, flush=True)
    s.sendall(b"hello\n")
    try:
        s.recv(10)
    except OSError:
        pass
    s.close()


if __name__ == "__main__":
    main()
