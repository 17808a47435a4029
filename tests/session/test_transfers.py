"""Data-connection set-up and transfers as the core decides them: PASV EPSV PORT
EPRT (no FTP bounce), and the Transfer action of RETR STOR APPE STOU LIST NLST
MLSD (paths, offsets, atomic temp names, listings). The driver does the disk
part; moving bytes over sockets is tested end to end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from ftpcluster.worker.fs import TEMP_PREFIX
from ftpcluster.worker.protocol import ClosePassive, OpenPassive, SetActive, Transfer

from .driver import Driver


def last_transfer(d: Driver) -> Transfer:
    return [a for a in d.actions if isinstance(a, Transfer)][-1]


# ---------------------------------------------------------------- set-up
def test_pasv_and_epsv_replies(drv: Driver) -> None:
    d = drv
    assert d.text("PASV") == "227 Entering Passive Mode (127,0,0,1,195,80)."
    assert d.text("EPSV") == "229 Entering Extended Passive Mode (|||50000|)"
    assert isinstance(d.actions[-2], ClosePassive)  # the first listener is dropped
    assert [a.extended for a in d.actions if isinstance(a, OpenPassive)] == [False, True]


def test_epsv_all_allows_only_epsv(drv: Driver) -> None:
    d = drv
    assert d.code("EPSV ALL") == 200
    for line in ("PASV", "PORT 127,0,0,1,200,10", "EPRT |1|127.0.0.1|51210|"):
        assert d.reply(line).text == "Only EPSV is allowed after EPSV ALL", line
    assert d.code("EPSV") == 229


def test_epsv_and_eprt_of_the_other_family_is_522(make: Callable[..., Driver]) -> None:
    """RFC 2428 sections 2-3: 522 with the protocols this connection can use."""
    d = make("alice")
    assert d.text("EPSV 2").endswith("(1)") and d.code("EPSV 2") == 522
    assert d.code("EPRT |2|::1|50000|") == 522
    assert d.code("EPSV 1") == 229
    v6 = make("alice", client_ip="::1")
    assert v6.code("PASV") == 425 and v6.code("EPSV 1") == 522 and v6.code("EPSV 2") == 229
    assert v6.code("EPRT |2|::1|50000|") == 200
    mapped = make("alice", client_ip="::ffff:127.0.0.1")
    assert mapped.code("PASV") == 227 and mapped.code("EPRT |1|127.0.0.1|50000|") == 200


def test_active_mode_no_bounce(drv: Driver) -> None:
    d = drv
    assert d.code("PORT 127,0,0,1,200,10") == 200
    assert d.actions[-1] == SetActive("127.0.0.1", 51210)
    assert "bounce" in d.reply("PORT 10,0,0,1,200,10").text
    assert d.code("PORT 127,0,0,1,3,255") == 504  # a privileged port
    assert d.code("EPRT |1|127.0.0.2|51210|") == 504
    assert d.code("EPRT !1!127.0.0.1!51210!") == 200  # any delimiter
    assert d.code("EPRT |1|127.0.0.1|1023|") == 504


# ---------------------------------------------------------------- downloads
def test_retr_transfer(drv: Driver) -> None:
    d = drv
    assert d.code("RETR f.txt") == 425  # no data connection yet
    d.code("EPSV")
    got = d.send("RETR f.txt")
    assert [r.code for r in got] == [150, 226]
    assert got[0].text == "Opening BINARY mode data connection for /f.txt (3 bytes)"
    t = last_transfer(d)
    assert (t.kind, t.path, t.offset, t.ascii, t.virtual, t.command) == (
        "send_file", str(d.home / "f.txt"), 0, False, "/f.txt", "RETR")
    event = [e for e in d.events if e.name == "transfer"][-1]
    assert event.fields["bytes"] == 3 and event.fields["status"] == "ok"
    assert d.code("RETR f.txt") == 425  # one data connection per transfer


def test_retr_refusals(drv: Driver) -> None:
    d = drv
    d.code("EPSV")
    for line in ("RETR d", "RETR nope", "RETR /"):
        assert d.code(line) == 550, line
    os.chmod(d.home / "f.txt", 0)
    try:
        if os.geteuid() != 0:
            assert d.code("RETR f.txt") == 550
    finally:
        os.chmod(d.home / "f.txt", 0o644)


def test_ascii_mode(drv: Driver) -> None:
    d = drv
    d.code("TYPE A")
    d.code("EPSV")
    assert "ASCII mode" in d.send("RETR lines.txt")[0].text
    assert d.sent == b"one\r\ntwo\r\n" and last_transfer(d).ascii
    assert d.code("REST 2") == 350 and d.code("EPSV") == 229
    assert "ASCII" in d.reply("RETR lines.txt").text  # 554; REST is used up, the connection stays
    assert d.code("RETR lines.txt") == 226
    assert d.code("REST 2") == 350 and d.code("EPSV") == 229 and d.code("STOR lines.txt") == 554


# ---------------------------------------------------------------- uploads
def test_stor_is_atomic(drv: Driver) -> None:
    d = drv
    d.code("EPSV")
    d.hold_transfers = True
    assert [r.code for r in d.send("STOR new.bin")] == [150]
    t = last_transfer(d)
    assert t.kind == "receive_file" and t.path == str(d.home / "new.bin")
    assert os.path.dirname(t.temp_path) == str(d.home) and os.path.basename(t.temp_path).startswith(TEMP_PREFIX)
    assert f".{os.getpid()}." in t.temp_path  # the owner can be told (upload_journal)
    assert [r.code for r in d.finish()] == [226]
    assert (d.home / "new.bin").read_bytes() == b"data"


@pytest.mark.parametrize("line,settings,in_place", [("STOR f.txt", {}, False), ("APPE f.txt", {}, True),
                                                    ("STOR f.txt", {"atomic_uploads": False}, True)])
def test_upload_in_place_or_not(make: Callable[..., Driver], line: str, settings: dict[str, Any], in_place: bool) -> None:
    d = make("alice", **settings)
    d.code("EPSV")
    assert d.code(line) == 226
    t = last_transfer(d)
    assert (t.temp_path == "") is in_place and t.append is line.startswith("APPE")
    want = b"abcdata" if line.startswith("APPE") else b"data"
    assert (d.home / "f.txt").read_bytes() == want


def test_rest_stor_resumes_in_place(drv: Driver) -> None:
    d = drv
    (d.home / "r.bin").write_bytes(b"0123")
    d.upload = b"45"
    d.code("REST 4")
    d.code("EPSV")
    assert d.code("STOR r.bin") == 226
    assert last_transfer(d).temp_path == "" and last_transfer(d).offset == 4
    assert (d.home / "r.bin").read_bytes() == b"012345"


@pytest.mark.parametrize("line", ["STOR missing.bin", "APPE missing.bin", "STOU", "STOU f.txt", "STOR f.txt"])
def test_rest_upload_past_end_or_of_missing_file_is_554(drv: Driver, line: str) -> None:
    d = drv
    d.code("REST 10")
    d.code("EPSV")
    assert d.code(line) == 554
    assert not [p for p in os.listdir(d.home) if p.startswith(("missing", "ftp.upload", "f.txt."))]
    assert d.s.rest == 0


def test_upload_refusals(drv: Driver) -> None:
    d = drv
    d.code("EPSV")
    assert d.code("STOR d") == 550  # a directory
    assert d.code("STOR /") == 550
    assert d.code("STOR nope/x") == 553
    assert d.reply("STOR nope/x").text == "No such directory"


def test_stou_names_the_file_it_made(drv: Driver) -> None:
    """RFC 1123 4.1.2.9: 150 FILE: name; relative to the cwd when it is there."""
    d = drv
    for arg, shown in (("u.txt", "FILE: u.txt"), ("d/u.txt", "FILE: /d/u.txt"), ("", "FILE: ftp.upload")):
        d.code("EPSV")
        assert d.send(f"STOU {arg}".rstrip())[0].text == shown
        d.code("EPSV")
        assert d.send(f"STOU {arg}".rstrip())[0].text == shown + ".1"
    t = last_transfer(d)
    assert t.exclusive and t.temp_path == "" and t.command == "STOU"
    assert (d.home / "u.txt.1").read_bytes() == b"data"


def test_stou_gives_up_after_a_thousand_names(drv: Driver) -> None:
    d = drv
    (d.home / "x").write_bytes(b"")
    for i in range(1, 1000):
        (d.home / f"x.{i}").write_bytes(b"")
    d.code("EPSV")
    assert d.reply("STOU x").code == 553


def test_limits_hook_can_refuse_and_wrap(make: Callable[..., Driver]) -> None:
    class Limits:
        def check(self, s: Any, t: Transfer) -> tuple[int, str] | None:
            if t.command == "STOR":
                return 552, "Quota exceeded"
            t.wrap = "wrapped"
            return None

        def site_quota(self, s: Any) -> list[str]:
            return ["Quota: 1 of 2", "End"]

    d = make("alice", limits=Limits())
    d.code("EPSV")
    assert d.reply("STOR q").code == 552 and d.s.data_ready  # the data connection stays for the next try
    assert d.code("RETR f.txt") == 226 and last_transfer(d).wrap == "wrapped"
    assert d.text("SITE QUOTA").startswith("200-Quota: 1 of 2")


# ---------------------------------------------------------------- listings
@pytest.fixture
def listed(drv: Driver) -> Driver:
    (drv.home / f"{TEMP_PREFIX}abcd").write_bytes(b"in flight")  # never shown
    (drv.home / "sub").mkdir()
    return drv


def _list(d: Driver, line: str) -> list[str]:
    d.code("EPSV")
    assert d.code(line) == 226, line
    assert last_transfer(d).kind == "send_lines" and last_transfer(d).ascii
    return d.sent.decode().split("\r\n")[:-1]


def test_list(listed: Driver) -> None:
    lines = _list(listed, "LIST")
    assert any(line.startswith("d") and line.endswith(" sub") for line in lines)
    assert any(line.startswith("-") and " 3 " in line and line.endswith(" f.txt") for line in lines)
    assert not any(TEMP_PREFIX in line for line in lines)
    assert [ln.rsplit(" ", 1)[1] for ln in lines] == sorted(ln.rsplit(" ", 1)[1] for ln in lines)
    assert _list(listed, "LIST -la") == lines  # ls options are ignored
    one = _list(listed, "LIST f.txt")
    assert len(one) == 1 and one[0].endswith(" f.txt")
    assert _list(listed, "LIST -l d") == [ln for ln in _list(listed, "LIST d")]
    (listed.home / "-la").write_bytes(b"dash")
    one = _list(listed, "LIST -- -la")  # '--' ends the options, as in ls
    assert len(one) == 1 and one[0].endswith(" -la")
    assert _list(listed, "NLST -l -- -la") == ["-la"]


def test_names_with_cr_or_lf_are_not_listed(listed: Driver) -> None:
    """Made outside FTP, such a name would read as two entries (a fake one)."""
    (listed.home / "evil\r\n213 injected").write_bytes(b"x")
    (listed.home / "lf\nname").write_bytes(b"x")
    for line in ("LIST", "NLST", "MLSD"):
        got = _list(listed, line)
        assert not any("injected" in ln or ln.endswith("lf") or ln.startswith("name") for ln in got), (line, got)
        assert any(ln.endswith("f.txt") for ln in got)


def test_mlsd_names_special_files(listed: Driver) -> None:
    os.mkfifo(listed.home / "pipe")
    facts = {ln.split(" ", 1)[1]: ln.split(" ", 1)[0] for ln in _list(listed, "MLSD")}
    assert facts["pipe"].startswith("type=OS.unix=fifo;") and "perm=df;" in facts["pipe"], facts["pipe"]


def test_nlst(listed: Driver) -> None:
    assert _list(listed, "NLST") == sorted(["d", "dangling_out", "f.txt", "file_link", "in_link", "lines.txt",
                                            "out_link", "sub"])  # fmt: skip
    assert _list(listed, "NLST d") == ["g.txt"]
    assert _list(listed, "NLST f.txt") == ["f.txt"]
    listed.code("EPSV")
    assert listed.code("NLST nope") == 550


def test_mlsd(listed: Driver) -> None:
    facts = {ln.split(" ", 1)[1]: ln.split(" ", 1)[0] for ln in _list(listed, "MLSD")}
    assert facts["f.txt"].startswith("type=file;size=3;") and "perm=radfw;" in facts["f.txt"]
    assert facts["sub"].startswith("type=dir;") and facts["."].startswith("type=cdir;")
    assert TEMP_PREFIX + "abcd" not in facts
    listed.code("EPSV")
    assert listed.reply("MLSD f.txt").code == 501  # MLSD needs a directory


def test_utf8_and_odd_names(drv: Driver) -> None:
    d = drv
    name = "файл 名前 ✓.txt"
    assert d.code("MKD dir ü 文件") == 257
    assert d.code("CWD dir ü 文件") == 250
    d.code("EPSV")
    assert d.code(f"STOR {name}") == 226
    assert (d.home / "dir ü 文件" / name).read_bytes() == b"data"
    assert _list(d, "NLST") == [name]
    raw = b"RNFR " + name.encode() + b"\r\n"
    assert [r.code for r in d.feed(raw)] == [350]
    assert [r.code for r in d.feed(b"RNTO \xff\xfe.bin\r\n")] == [250]  # not UTF-8: kept as bytes
    assert os.listdir(os.fsencode(d.home / "dir ü 文件")) == [b"\xff\xfe.bin"]
    d.code("EPSV")
    assert d.code("NLST") == 226 and d.sent == b"\xff\xfe.bin\r\n"


def test_listing_an_unreadable_directory(drv: Driver, home: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any directory")
    os.chmod(home / "d", 0)
    try:
        drv.code("EPSV")
        assert drv.code("LIST d") == 550
    finally:
        os.chmod(home / "d", 0o755)
