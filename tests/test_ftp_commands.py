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
def test_user_pass_quit_rein_noop(server: Server) -> None:
    f = server.ftp(login=False)
    assert code(f.getwelcome()) == "220"
    assert perm_code(f, "NOOP") == "200"
    assert perm_code(f, "PWD") == "530"  # not logged in yet
    assert perm_code(f, "PASS x") == "503"  # PASS before USER
    assert code(f.sendcmd(f"USER {server.user}")) == "331"
    assert code(f.sendcmd(f"PASS {server.password}")) == "230"
    assert perm_code(f, f"PASS {server.password}") == "503"  # already logged in
    assert code(f.sendcmd("PWD")) == "257"
    assert code(f.sendcmd("REIN")) == "220"
    assert perm_code(f, "PWD") == "530"  # REIN logged us out
    f.login(server.user, server.password)
    assert code(f.sendcmd("ACCT x")) == "202"
    assert code(f.quit()) == "221"


def test_wrong_password_is_530(server: Server) -> None:
    f = server.ftp(login=False)
    with pytest.raises(ftplib.error_perm, match="^530"):
        f.login(server.user, "wrong")
    f.login(server.user, server.password)
    f.quit()


def test_syst_feat_opts_help(server: Server) -> None:
    f = server.ftp()
    assert f.sendcmd("SYST").startswith("215 UNIX")
    feat = f.sendcmd("FEAT")
    assert code(feat) == "211"
    for word in ("UTF8", "EPSV", "EPRT", "MLST", "SIZE", "MDTM", "MFMT", "REST STREAM"):
        assert word in feat
    assert code(f.sendcmd("OPTS UTF8 ON")) == "200"
    assert perm_code(f, "OPTS UTF8 OFF") == "504"
    assert perm_code(f, "OPTS NOPE") == "501"
    # OPTS MLST narrows the facts MLST/MLSD return.
    assert code(f.sendcmd("OPTS MLST type;size;")) == "200"
    (server.home / "m.txt").write_bytes(b"12345")
    mlst = f.sendcmd("MLST m.txt")
    assert "type=file;size=5;" in mlst and "modify=" not in mlst
    assert "type*;size*;" in f.sendcmd("FEAT")
    helpall = f.sendcmd("HELP")
    assert code(helpall) == "214" and "RETR" in helpall and "XPWD" in helpall
    assert code(f.sendcmd("HELP STOR")) == "214"
    assert perm_code(f, "HELP BOGUS") == "502"
    f.quit()


def test_stat_server_and_path(server: Server) -> None:
    f = server.ftp()
    st = f.sendcmd("STAT")
    assert code(st) == "211" and "Logged in as alice" in st and "Session " in st
    (server.home / "d").mkdir()
    (server.home / "d" / "inner.txt").write_bytes(b"x" * 7)
    listing = f.sendcmd("STAT d")
    assert code(listing) == "212" and "inner.txt" in listing  # directory status
    assert code(f.sendcmd("STAT d/inner.txt")) == "213"  # file status
    assert perm_code(f, "STAT nope") == "550"
    f.quit()


def test_type_mode_stru_allo(server: Server) -> None:
    f = server.ftp()
    assert code(f.sendcmd("TYPE A")) == "200"
    assert code(f.sendcmd("TYPE I")) == "200"
    assert code(f.sendcmd("TYPE L 8")) == "200"
    assert perm_code(f, "TYPE E") == "504"
    assert code(f.sendcmd("MODE S")) == "200"
    assert perm_code(f, "MODE B") == "504"
    assert code(f.sendcmd("STRU F")) == "200"
    assert perm_code(f, "STRU R") == "504"
    assert code(f.sendcmd("ALLO 1000")) == "202"
    f.quit()


# ---------------------------------------------------------------- navigation and file management
def test_pwd_cwd_cdup_mkd_rmd(server: Server) -> None:
    f = server.ftp()
    assert f.pwd() == "/"
    assert f.mkd("a") == "/a"
    assert (server.home / "a").is_dir()
    f.mkd("a/b")
    f.cwd("a/b")
    assert f.pwd() == "/a/b"
    assert code(f.sendcmd("CDUP")) == "250"
    assert f.pwd() == "/a"
    f.cwd("/")
    assert code(f.sendcmd("CDUP")) == "250"  # CDUP at the root stays there
    assert f.pwd() == "/"
    assert perm_code(f, "CWD nope") == "550"
    (server.home / "file").write_bytes(b"")
    assert perm_code(f, "CWD file") == "550"
    assert perm_code(f, "RMD a") == "550"  # not empty
    f.rmd("a/b")
    f.rmd("a")
    assert not (server.home / "a").exists()
    assert perm_code(f, "RMD /") == "550"
    assert perm_code(f, "MKD file") == "550"  # exists
    f.quit()


def test_x_aliases(server: Server) -> None:
    f = server.ftp()
    assert code(f.sendcmd("XMKD xd")) == "257"
    assert (server.home / "xd").is_dir()
    assert code(f.sendcmd("XCWD xd")) == "250"
    assert '"/xd"' in f.sendcmd("XPWD")
    assert code(f.sendcmd("XCUP")) == "250"
    assert '"/"' in f.sendcmd("XPWD")
    assert code(f.sendcmd("XRMD xd")) == "250"
    assert not (server.home / "xd").exists()
    f.quit()


def test_dele_rename_size_mdtm_mfmt(server: Server) -> None:
    f = server.ftp()
    (server.home / "a.txt").write_bytes(b"hello world")
    assert f.size("a.txt") == 11
    (server.home / "dir").mkdir()
    assert perm_code(f, "SIZE dir") == "550"
    assert perm_code(f, "SIZE nope") == "550"
    assert code(f.sendcmd("RNFR a.txt")) == "350"
    assert code(f.sendcmd("RNTO dir/b.txt")) == "250"
    assert not (server.home / "a.txt").exists()
    assert (server.home / "dir" / "b.txt").read_bytes() == b"hello world"
    assert perm_code(f, "RNFR nope") == "550"
    assert code(f.sendcmd("MFMT 20200102030405 dir/b.txt")) == "213"
    assert f.sendcmd("MDTM dir/b.txt") == "213 20200102030405"
    assert int((server.home / "dir" / "b.txt").stat().st_mtime) == 1577934245
    assert perm_code(f, "MFMT 2020 dir/b.txt") == "501"
    assert perm_code(f, "MFMT 20201340250000 dir/b.txt") == "501"
    assert code(f.delete("dir/b.txt")) == "250"
    assert not (server.home / "dir" / "b.txt").exists()
    assert perm_code(f, "DELE dir") == "550"  # a directory
    assert perm_code(f, "DELE nope") == "550"
    f.quit()


def test_site_chmod_and_help(server: Server) -> None:
    f = server.ftp()
    p = server.home / "c.txt"
    p.write_bytes(b"x")
    assert code(f.sendcmd("SITE CHMOD 600 c.txt")) == "200"
    assert p.stat().st_mode & 0o777 == 0o600
    assert code(f.sendcmd("SITE CHMOD 0755 c.txt")) == "200"
    assert p.stat().st_mode & 0o777 == 0o755
    assert perm_code(f, "SITE CHMOD 999 c.txt") == "501"
    assert perm_code(f, "SITE CHMOD 600") == "501"
    assert perm_code(f, "SITE CHMOD 600 nope") == "550"
    assert code(f.sendcmd("SITE HELP")) == "214"
    assert perm_code(f, "SITE NOPE") == "500"
    f.quit()


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
