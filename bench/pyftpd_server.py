"""pyftpdlib peer for the bench, run as its own process: TLS handler (FTPS is
optional, like ftpcluster's `required = "off"`), prefork workers, a passive
range and one user. Logging at WARNING so per-command logs don't weigh in."""

from __future__ import annotations

import argparse
import logging

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import TLS_FTPHandler
from pyftpdlib.log import config_logging
from pyftpdlib.servers import FTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--passive", required=True, help="lo-hi")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-cons", type=int, default=20000)
    a = ap.parse_args()

    config_logging(level=logging.WARNING)
    auth = DummyAuthorizer()
    auth.add_user(a.user, a.password, a.home, perm="elradfmwMT")
    lo, hi = (int(x) for x in a.passive.split("-"))

    class Handler(TLS_FTPHandler):
        certfile = a.cert
        keyfile = a.key
        tls_control_required = False
        tls_data_required = False
        passive_ports = list(range(lo, hi + 1))
        banner = "pyftpdlib ready"
        timeout = 600

    Handler.authorizer = auth
    server = FTPServer((a.host, a.port), Handler)
    server.max_cons = a.max_cons
    server.max_cons_per_ip = 0
    server.serve_forever(worker_processes=max(1, a.workers))


if __name__ == "__main__":
    main()
