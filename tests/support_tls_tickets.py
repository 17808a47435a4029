"""A bare TLS server process with cluster ticket keys derived from SECRET.

    python -m tests.support_tls_tickets PORT SECRET CERT KEY"""

from __future__ import annotations

import hashlib
import socket
import ssl
import sys

from ftpcluster.worker.tls_tickets import install_ticket_keys


def main() -> None:
    port, secret, cert, key = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3], sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tk = install_ticket_keys(ctx, lambda e: hashlib.shake_256(secret + str(e).encode()).digest(80), 3600,
                             lambda e: print("error", e, flush=True))  # fmt: skip
    ls = socket.create_server(("127.0.0.1", port))
    ls.settimeout(30)
    print("ready", flush=True)
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
