"""Every FTP command of the core server, driven by ftplib against a real server process.

Each test names the commands it covers; replies are checked by code (and by the
file system on disk, which is the ground truth for what a command changed)."""

from __future__ import annotations

import ftplib
import io
import os
import socket

import pytest

from .support_server import Server, wait_for

TEMP_PREFIX = ".ftpcluster-upload."


def code(reply: str) -> str:
    return reply[:3]


def perm_code(f: ftplib.FTP, cmd: str) -> str:
    """Send `cmd` and return the reply code, whatever it is (ftplib raises on 4xx/5xx)."""
    try:
        return code(f.sendcmd(cmd))
    except ftplib.all_errors as e:
        return code(str(e))


def retr_bytes(f: ftplib.FTP, name: str, rest: int | None = None) -> bytes:
    out = io.BytesIO()
    f.retrbinary(f"RETR {name}", out.write, rest=rest)
    return out.getvalue()


def raw_retr(f: ftplib.FTP, cmd: str) -> bytes:
    """Read a data connection whole, whatever TYPE is set (retrlines would rewrite line ends)."""
    conn = f.transfercmd(cmd)
    chunks = []
    with conn:
        while data := conn.recv(65536):
            chunks.append(data)
    f.voidresp()
    return b"".join(chunks)


# ---------------------------------------------------------------- login and session


def test_wrong_password_is_530(server: Server) -> None:
    f = server.ftp(login=False)
    with pytest.raises(ftplib.error_perm, match="^530"):
        f.login(server.user, "wrong")
    f.login(server.user, server.password)
    f.quit()



# ---------------------------------------------------------------- navigation and file management



# ---------------------------------------------------------------- listings
def test_list_nlst_mlsd_mlst(server: Server) -> None:
    f = server.ftp()
    (server.home / "sub").mkdir()
    (server.home / "f1.txt").write_bytes(b"abc")
    (server.home / f"{TEMP_PREFIX}abcd").write_bytes(b"in flight")  # never shown
    lines: list[str] = []
    f.retrlines("LIST", lines.append)
    assert any(line.startswith("d") and line.endswith(" sub") for line in lines)
    assert any(line.startswith("-") and " 3 " in line and line.endswith(" f1.txt") for line in lines)
    assert not any(TEMP_PREFIX in line for line in lines)
    lines = []
    f.retrlines("LIST -la", lines.append)  # ls options are ignored
    assert any(line.endswith(" f1.txt") for line in lines)
    lines = []
    f.retrlines("LIST f1.txt", lines.append)
    assert len(lines) == 1 and lines[0].endswith(" f1.txt")
    assert sorted(f.nlst()) == ["f1.txt", "sub"]
    facts = dict(f.mlsd())
    assert facts["f1.txt"]["type"] == "file" and facts["f1.txt"]["size"] == "3"
    assert facts["sub"]["type"] == "dir"
    assert facts["."]["type"] == "cdir"
    assert TEMP_PREFIX + "abcd" not in facts
    mlst = f.sendcmd("MLST f1.txt")
    assert code(mlst) == "250" and "type=file;size=3;" in mlst and "/f1.txt" in mlst
    with pytest.raises(ftplib.error_perm, match="^501"):
        list(f.mlsd("f1.txt"))  # MLSD needs a directory
    with pytest.raises(ftplib.error_perm, match="^550"):
        f.nlst("nope")
    f.quit()


def test_utf8_names(server: Server) -> None:
    f = server.ftp()
    d = "dir with space ünïcødé 文件"
    name = "файл 名前 ✓.txt"
    f.mkd(d)
    f.cwd(d)
    data = "ünïcødé content".encode()
    f.storbinary(f"STOR {name}", io.BytesIO(data))
    assert (server.home / d / name).read_bytes() == data
    assert f.nlst() == [name]
    assert name in dict(f.mlsd())
    assert retr_bytes(f, name) == data
    f.cwd("/")
    assert f.size(f"{d}/{name}") == len(data)
    f.rename(f"{d}/{name}", "ok ✓")
    assert (server.home / "ok ✓").exists()
    f.quit()


# ---------------------------------------------------------------- transfers
def test_retr_stor_appe_stou(server: Server) -> None:
    f = server.ftp()
    data = os.urandom(300_000)
    f.storbinary("STOR s.bin", io.BytesIO(data))
    assert (server.home / "s.bin").read_bytes() == data
    assert retr_bytes(f, "s.bin") == data
    f.storbinary("APPE s.bin", io.BytesIO(b"tail"))
    assert (server.home / "s.bin").read_bytes() == data + b"tail"
    f.storbinary("APPE new.bin", io.BytesIO(b"fresh"))  # APPE creates
    assert (server.home / "new.bin").read_bytes() == b"fresh"
    # STOR replaces the whole file
    f.storbinary("STOR s.bin", io.BytesIO(b"short"))
    assert (server.home / "s.bin").read_bytes() == b"short"
    # STOU never overwrites: the reply names the file it made
    conn, _ = f.ntransfercmd("STOU s.bin")
    with conn:
        conn.sendall(b"unique")
    resp = f.voidresp()
    assert code(resp) == "226"
    assert (server.home / "s.bin").read_bytes() == b"short"
    made = [p for p in server.home.iterdir() if p.name.startswith("s.bin.")]
    assert len(made) == 1 and made[0].read_bytes() == b"unique"
    conn, _ = f.ntransfercmd("STOU")
    with conn:
        conn.sendall(b"noname")
    f.voidresp()
    assert (server.home / "ftp.upload").read_bytes() == b"noname"
    with pytest.raises(ftplib.error_perm, match="^550"):
        retr_bytes(f, "nope")
    with pytest.raises(ftplib.error_perm, match="^55"):
        f.storbinary("STOR nodir/x", io.BytesIO(b"x"))
    f.quit()


def test_rest_resumes_retr_and_stor(server: Server) -> None:
    f = server.ftp()
    data = os.urandom(100_000)
    (server.home / "r.bin").write_bytes(data)
    assert retr_bytes(f, "r.bin", rest=12_345) == data[12_345:]
    assert retr_bytes(f, "r.bin", rest=len(data)) == b""
    with pytest.raises(ftplib.error_perm, match="^55"):
        retr_bytes(f, "r.bin", rest=len(data) + 1)
    assert perm_code(f, "REST abc") == "501"
    # STOR resume: the first half is there, send the rest from the offset.
    (server.home / "up.bin").write_bytes(data[:40_000])
    f.storbinary("STOR up.bin", io.BytesIO(data[40_000:]), rest=40_000)
    assert (server.home / "up.bin").read_bytes() == data
    # A REST is used once: the RETR after the one it applied to starts at 0.
    assert code(f.sendcmd("REST 10")) == "350"
    f.sendcmd("NOOP")
    assert retr_bytes(f, "up.bin") == data[10:]  # REST stays armed until a RETR/STOR uses it
    assert retr_bytes(f, "up.bin") == data
    f.quit()


def test_ascii_mode_converts_line_endings(server: Server) -> None:
    f = server.ftp()
    (server.home / "t.txt").write_bytes(b"one\ntwo\r\nthree\n")
    f.sendcmd("TYPE A")
    assert raw_retr(f, "RETR t.txt") == b"one\r\ntwo\r\nthree\r\n"
    conn = f.transfercmd("STOR up.txt")
    with conn:
        conn.sendall(b"a\r\nb\r\n" * 1000 + b"end")
    f.voidresp()
    assert (server.home / "up.txt").read_bytes() == b"a\nb\n" * 1000 + b"end"
    f.sendcmd("TYPE I")
    assert raw_retr(f, "RETR t.txt") == b"one\ntwo\r\nthree\n"  # binary: untouched
    f.quit()


def test_pasv_epsv_and_epsv_all(server: Server) -> None:
    f = server.ftp()
    (server.home / "p.bin").write_bytes(b"pasv data")
    resp = f.sendcmd("PASV")
    assert code(resp) == "227"
    host, port = ftplib.parse227(resp)
    assert host == "127.0.0.1" and server.passive[0] <= port <= server.passive[1]
    with socket.create_connection((host, port), timeout=5) as s:
        f.sendcmd("RETR p.bin")
        assert s.makefile("rb").read() == b"pasv data"
    f.voidresp()
    resp = f.sendcmd("EPSV")
    assert code(resp) == "229"
    port = int(resp.split("|")[3])
    assert server.passive[0] <= port <= server.passive[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f.sendcmd("RETR p.bin")
        assert s.makefile("rb").read() == b"pasv data"
    f.voidresp()
    assert perm_code(f, "EPSV 3") == "522"
    assert code(f.sendcmd("EPSV ALL")) == "200"
    assert perm_code(f, "PASV") == "503"
    assert perm_code(f, "PORT 127,0,0,1,200,10") == "503"
    assert perm_code(f, "EPRT |1|127.0.0.1|51210|") == "503"
    f.af = socket.AF_INET6  # make ftplib use EPSV from now on
    assert retr_bytes(f, "p.bin") == b"pasv data"
    f.quit()


def test_port_and_eprt_active_mode(server: Server) -> None:
    f = server.ftp()
    data = os.urandom(50_000)
    (server.home / "a.bin").write_bytes(data)
    f.set_pasv(False)  # ftplib sends PORT to the control connection's own address
    assert retr_bytes(f, "a.bin") == data
    f.storbinary("STOR b.bin", io.BytesIO(data))
    assert (server.home / "b.bin").read_bytes() == data
    with socket.create_server(("127.0.0.1", 0)) as ls:
        ls.settimeout(10)
        port = ls.getsockname()[1]
        assert code(f.sendcmd(f"EPRT |1|127.0.0.1|{port}|")) == "200"
        assert code(f.sendcmd("RETR a.bin")) == "150"
        conn, _ = ls.accept()
        with conn:
            got = conn.makefile("rb").read()
    f.voidresp()
    assert got == data
    f.quit()


def test_active_mode_no_bounce(server: Server) -> None:
    f = server.ftp()
    # Another address (still loopback, never contacted because it is refused).
    assert perm_code(f, "PORT 127,0,0,2,200,10") == "504"
    assert perm_code(f, "EPRT |1|127.0.0.2|51210|") == "504"
    # Own address but a privileged port.
    assert perm_code(f, "PORT 127,0,0,1,0,21") == "504"
    assert perm_code(f, "EPRT |1|127.0.0.1|80|") == "504"
    # None of these armed a data connection.
    assert perm_code(f, "RETR x") in ("425", "550")
    (server.home / "x").write_bytes(b"x")
    assert perm_code(f, "RETR x") == "425"
    f.quit()


def test_abor_during_big_retr(server: Server) -> None:
    f = server.ftp()
    big = server.home / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(512 * 1024 * 1024)  # sparse: cheap to make, long to send
    conn = f.transfercmd("RETR big.bin")
    assert len(conn.recv(65536)) > 0
    # Leave the data unread so the server is blocked mid-sendfile, then ABOR.
    resp = f.abort()
    assert code(resp) == "426"
    assert code(f.getresp()) == "226"
    conn.close()
    assert code(f.sendcmd("NOOP")) == "200"
    assert retr_bytes(f, "big.bin", rest=big.stat().st_size - 10) == b"\0" * 10
    assert code(f.sendcmd("ABOR")) == "225"  # nothing running
    f.quit()


def test_stor_is_atomic(server: Server) -> None:
    """While a STOR runs only a hidden temp name exists; the final name appears at 226."""
    f = server.ftp()
    (server.home / "keep.bin").write_bytes(b"old content")
    conn = f.transfercmd("STOR keep.bin")
    conn.sendall(b"A" * 100_000)

    def temp_names() -> list[str]:
        return [n for n in os.listdir(server.home) if n.startswith(TEMP_PREFIX)]

    assert wait_for(lambda: bool(temp_names()) and (server.home / temp_names()[0]).stat().st_size == 100_000)
    assert (server.home / "keep.bin").read_bytes() == b"old content"  # readers still see the old file
    # A new name: does not exist at all while the upload runs.
    conn2_ctl = server.ftp()
    conn2 = conn2_ctl.transfercmd("STOR fresh.bin")
    conn2.sendall(b"B" * 1000)
    assert wait_for(lambda: len(temp_names()) == 2)
    assert "fresh.bin" not in os.listdir(server.home)
    reader = server.ftp()  # a third client sees neither the temp name nor the final one
    assert "fresh.bin" not in reader.nlst() and not any(n.startswith(TEMP_PREFIX) for n in reader.nlst())
    reader.quit()
    conn2.close()
    conn2_ctl.voidresp()
    assert (server.home / "fresh.bin").read_bytes() == b"B" * 1000
    conn.sendall(b"A" * 100_000)
    conn.close()
    f.voidresp()
    assert (server.home / "keep.bin").read_bytes() == b"A" * 200_000
    assert temp_names() == []
    conn2_ctl.quit()
    f.quit()
