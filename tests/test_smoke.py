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
