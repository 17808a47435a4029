"""RFC edge behaviours that real clients meet (issue 18), one test per behaviour,
all against one shared server (conftest `rfc_server`: plain FTP, explicit TLS available).

Raw sockets where a client library would hide the exact reply (MLST's line
format, the order of 226 and 221), ftplib and curl where a client's reaction
to the reply is the point."""

from __future__ import annotations

import ftplib
import io
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ftpcluster.worker.protocol import OpenPassive, Reply
from ftpcluster.worker.session import Session, SessionSettings, User

from .support_server import Server, have
from .test_bad_input import Raw, rst_close
from .test_ftps import client_ctx

BIG = 48 * 1024 * 1024  # bigger than any socket buffers: a transfer that cannot finish unread


@pytest.fixture(scope="module")
def srv(rfc_server: Server) -> Server:
    s = rfc_server
    (s.home / "f.txt").write_bytes(b"abc")
    (s.home / "lines.txt").write_bytes(b"one\ntwo\n")
    with open(s.home / "big.bin", "wb") as fh:
        fh.truncate(BIG)  # sparse
    return s


def login(srv: Server) -> Raw:
    c = Raw(srv)
    c.login()
    return c


def lines_of(text: bytes) -> list[bytes]:
    return text.split(b"\n")


# ---------------------------------------------------------------- 1. MLST line format
def test_mlst_entry_is_one_space_facts_space_path(srv: Server) -> None:
    """RFC 3659 section 7.2: ' facts path' with every fact ending in ';'."""
    c = login(srv)
    code, text = c.reply_to("MLST f.txt")
    assert code == 250
    first, entry, last = lines_of(text)
    assert first.startswith(b"250-") and last.startswith(b"250 ")
    assert entry.startswith(b" type=file;size=3;modify=") and entry.endswith(b"; /f.txt")
    assert not entry.startswith(b"  ")
    # No facts at all: the space that ends the (empty) facts is still there.
    code, text = c.reply_to("OPTS MLST")
    assert code == 200 and text == b"200 MLST OPTS"
    assert lines_of(c.reply_to("MLST f.txt")[1])[1] == b"  /f.txt"
    assert c.cmd("OPTS MLST size;") == 200
    assert lines_of(c.reply_to("MLST f.txt")[1])[1] == b" size=3; /f.txt"
    c.close()
    # ftplib's MLSD parser (partition at the first space) reads both forms.
    f = srv.ftp()
    assert dict(f.mlsd())["f.txt"]["size"] == "3"
    f.sendcmd("OPTS MLST")
    assert "f.txt" in dict(f.mlsd())
    f.quit()


# ---------------------------------------------------------------- 2. SIZE under TYPE A


@pytest.mark.skipif(not have("curl"), reason="curl not installed")
def test_curl_ascii_resume_upload_survives_size_refusal(srv: Server, tmp_path: Path) -> None:
    """curl -B -C - asks SIZE under TYPE A; on 550 it uploads the whole file."""
    src = tmp_path / "a.txt"
    src.write_bytes(b"x\ny\n")
    (srv.home / "curl-a.txt").write_bytes(b"x\n")  # half there: curl would resume
    r = subprocess.run(["curl", "-sS", "-v", "--max-time", "20", "-B", "-C", "-", "-T", str(src), srv.url("/curl-a.txt")],
                       capture_output=True, timeout=30)  # fmt: skip
    log = r.stderr.decode(errors="replace")
    assert r.returncode == 0, log
    assert "< 550 SIZE not allowed in ASCII mode" in log
    assert (srv.home / "curl-a.txt").read_bytes() == b"x\ny\n"


# ---------------------------------------------------------------- 3. EPSV/EPRT protocol


# ---------------------------------------------------------------- 4. REST with uploads
def test_rest_upload_past_end_or_of_missing_file_is_554(srv: Server) -> None:
    f = srv.ftp()
    for cmd in ("STOR missing.bin", "APPE missing.bin", "STOU", "STOU f.txt"):
        with pytest.raises(ftplib.error_perm, match="^554"):
            f.storbinary(cmd, io.BytesIO(b"abc"), rest=10)
        assert not (srv.home / "missing.bin").exists()
    with pytest.raises(ftplib.error_perm, match="^554"):
        f.storbinary("APPE f.txt", io.BytesIO(b"x"), rest=4)  # f.txt has 3 bytes
    assert not [p for p in os.listdir(srv.home) if p.startswith(("ftp.upload", "f.txt."))]
    # At the end of the file it is a resume: STOR writes there, APPE appends.
    (srv.home / "r.bin").write_bytes(b"0123")
    f.storbinary("STOR r.bin", io.BytesIO(b"45"), rest=4)
    f.storbinary("APPE r.bin", io.BytesIO(b"67"), rest=6)
    assert (srv.home / "r.bin").read_bytes() == b"01234567"
    f.sendcmd("TYPE A")  # no restarts in ASCII: the offset of a CRLF stream is not a file offset
    f.sendcmd("REST 2")
    with pytest.raises(ftplib.error_perm, match="^554"):
        f.retrlines("RETR lines.txt", lambda line: None)
    f.quit()


# ---------------------------------------------------------------- 5. QUIT during an upload
def test_quit_during_upload_completes_it_then_226_221(srv: Server) -> None:
    c = login(srv)
    data = c.pasv()
    assert c.cmd("STOR quit.bin") == 150
    payload = os.urandom(2_000_000)
    data.sendall(payload[:1_000_000])
    c.send(b"QUIT\r\n")
    time.sleep(0.2)  # the server has read QUIT while the upload runs
    data.sendall(payload[1_000_000:])
    data.close()
    assert c.reply()[0] == 226
    assert c.reply()[0] == 221
    assert c.closed_by_server()
    assert (srv.home / "quit.bin").read_bytes() == payload


def test_quit_then_half_close_during_upload_still_completes(srv: Server) -> None:
    c = login(srv)
    data = c.pasv()
    assert c.cmd("STOR quit2.bin") == 150
    data.sendall(b"a" * 100_000)
    c.send(b"QUIT\r\nNOOP\r\n")  # nothing after QUIT is read
    c.sock.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
    data.sendall(b"b" * 100_000)
    data.close()
    assert [c.reply()[0], c.reply()[0]] == [226, 221]
    assert c.closed_by_server()
    assert (srv.home / "quit2.bin").read_bytes() == b"a" * 100_000 + b"b" * 100_000


def test_half_close_behind_a_password_check_gets_every_reply(srv: Server) -> None:
    """Commands piped in and the input closed (ncat, `nc -N`, a script): the password
    check of a user not yet cached is still out when the FIN arrives. Every command
    is answered, in order, then the server closes."""
    from .support_server import cli, wait_for

    home = srv.dir / "homes" / "halfclose"
    r = cli("user", "add", "halfclose", "--home", str(home), "--password-stdin", config=srv.config, input="hc-pw\n")
    assert r.returncode == 0, r.stderr

    def answers() -> list[int]:
        c = Raw(srv)
        c.send(b"USER halfclose\r\nPASS hc-pw\r\nNOOP\r\nQUIT\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        codes = [c.reply()[0] for _ in range(4)]
        assert c.closed_by_server()
        c.close()
        return codes

    # (the nodes read the users file within about 2 s: 530 until then)
    assert wait_for(lambda: answers() == [331, 230, 200, 221], timeout=15), answers()


# ---------------------------------------------------------------- 6. REIN and USER during a transfer
@pytest.mark.parametrize("cmd,expect", [("REIN", 220), ("USER alice", 331)])
def test_rein_user_during_retr_answered_at_once(srv: Server, cmd: str, expect: int) -> None:
    """The client waits for the reply before it reads the data: answered at once,
    the transfer goes on and its 226 follows."""
    c = login(srv)
    data = c.pasv()
    assert c.cmd("RETR big.bin") == 150
    data.settimeout(10)
    got = len(data.recv(65536))
    code, text = c.reply_to("STAT")  # RFC 959: STAT during a transfer tells about it
    assert code == 211 and b"Transfer in progress: RETR /big.bin" in text
    assert c.cmd(cmd) == expect  # the data is unread: the server is blocked sending it
    while chunk := data.recv(1 << 20):
        got += len(chunk)
    data.close()
    assert got == BIG
    assert c.reply()[0] == 226
    assert c.cmd("PWD") == 530  # logged out
    if cmd == "REIN":
        assert c.cmd("USER alice") == 331
    assert c.cmd(f"PASS {srv.password}") == 230
    c.close()


def test_pipelined_commands_during_a_transfer_keep_their_order(srv: Server) -> None:
    """PWD then REIN sent together during a transfer: PWD waits for the transfer, and
    REIN waits behind it, so the replies come in the order of the commands."""
    c = login(srv)
    data = c.pasv()
    assert c.cmd("RETR big.bin") == 150
    c.send(b"PWD\r\nREIN\r\n")
    got = 0
    data.settimeout(10)
    while chunk := data.recv(1 << 20):
        got += len(chunk)
    data.close()
    assert got == BIG
    assert [c.reply()[0] for _ in range(3)] == [226, 257, 220]
    c.close()


def test_rein_before_the_data_connection_is_made_keeps_the_transfer(srv: Server) -> None:
    c = login(srv)
    code, text = c.reply_to("EPSV")
    port = int(text.split(b"|")[3])
    assert c.cmd("RETR f.txt") == 150
    assert c.cmd("REIN") == 220
    with socket.create_connection(("127.0.0.1", port), timeout=10) as data:
        assert data.makefile("rb").read() == b"abc"
    assert c.reply()[0] == 226
    c.close()


# ---------------------------------------------------------------- 7. TLS data connection dropped
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_data_connection_dropped_mid_retr_is_426(srv: Server, tls: bool) -> None:
    f = ftplib.FTP_TLS(context=client_ctx(), timeout=10) if tls else ftplib.FTP(timeout=10)
    f.connect(srv.host, srv.port)
    f.login(srv.user, srv.password)
    if tls:
        f.prot_p()
    conn = f.transfercmd("RETR big.bin")
    assert len(conn.recv(65536)) > 0
    rst_close(conn)  # RST, no close_notify: a crashed client
    with pytest.raises(ftplib.error_temp, match="^426"):
        f.voidresp()
    assert f.voidcmd("NOOP").startswith("200")
    # REIN keeps TLS on the control channel: the next login goes over the same TLS.
    assert f.sendcmd("REIN").startswith("220")
    assert f.sendcmd(f"USER {srv.user}").startswith("331")
    assert f.sendcmd(f"PASS {srv.password}").startswith("230")
    f.quit()


# ---------------------------------------------------------------- 8. SITE HELP topics


# ---------------------------------------------------------------- the same over IPv6
def test_ipv6_control_connection_families(tmp_path: Path) -> None:
    """On IPv6, EPSV 1 and EPRT |1| are the other family (522, use (2)); PASV cannot
    carry an IPv6 address (RFC 2428 section 1) and is refused; EPSV/EPRT work.
    Driven through the sans-IO session: the replies do not depend on a socket."""
    s = Session(SessionSettings(), client_ip="::1")
    s.receive_data(b"USER alice\r\nPASS x\r\n")
    s.auth_done(User("alice", str(tmp_path)))

    def reply(line: str) -> str:
        return " ".join(o.encode().decode().strip() for o in s.receive_data(line.encode() + b"\r\n") if isinstance(o, Reply))

    assert reply("EPSV 1") == "522 Network protocol not supported, use (2)"
    assert reply("PASV").startswith("425")
    assert reply("EPRT |1|127.0.0.1|50000|").startswith("522")
    assert reply("EPRT |2|::1|50000|").startswith("200")
    assert any(isinstance(o, OpenPassive) for o in s.receive_data(b"EPSV 2\r\n"))
