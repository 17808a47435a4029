"""The server starts and serves a login with ftplib."""

import io
import os


def test_login_upload_download(server):
    f = server.ftp()
    data = os.urandom(200_000)
    f.storbinary("STOR a.bin", io.BytesIO(data))
    out = io.BytesIO()
    f.retrbinary("RETR a.bin", out.write)
    assert out.getvalue() == data
    f.quit()


def test_plain_asyncio_loop_works(server_factory, monkeypatch):
    """uvloop is the default where installed; plain asyncio must keep working (FTPS included)."""
    from .test_ftps import tls_login

    monkeypatch.setenv("FTPCLUSTER_LOOP", "asyncio")
    srv = server_factory(tls=True)
    f = tls_login(srv)
    data = os.urandom(300_000)
    f.storbinary("STOR b.bin", io.BytesIO(data))
    out = io.BytesIO()
    f.retrbinary("RETR b.bin", out.write)
    assert out.getvalue() == data
    f.quit()
    g = srv.ftp()
    out = io.BytesIO()
    g.retrbinary("RETR b.bin", out.write)
    assert out.getvalue() == data
    g.quit()
