"""Commands that answer on the control connection alone, with the disk as the
ground truth: login, SYST FEAT OPTS HELP STAT, TYPE MODE STRU ALLO, PWD CWD CDUP
MKD RMD and their X aliases, DELE RNFR RNTO SIZE MDTM MFMT, SITE CHMOD/HELP.
(Moved here from the end-to-end tests/test_ftp_commands.py: none needs a socket.)"""

from __future__ import annotations

from typing import Callable

from .driver import Driver


def test_user_pass_quit_rein_noop(make: Callable[..., Driver]) -> None:
    d = make()
    assert d.replies[0].code == 220
    assert d.code("NOOP") == 200
    assert d.code("PWD") == 530  # not logged in yet
    assert d.code("PASS x") == 503  # PASS before USER
    d.login()
    assert d.code("PASS s3cret-pw") == 503  # already logged in
    assert d.code("PWD") == 257
    assert d.code("REIN") == 220
    assert d.code("PWD") == 530  # REIN logged us out
    d.login()
    assert d.code("ACCT x") == 202
    assert d.code("QUIT") == 221 and d.server_closed and d.s.closed
    assert d.send("NOOP") == []  # nothing is read after the close


def test_wrong_password_is_530(make: Callable[..., Driver]) -> None:
    d = make(max_login_attempts=3)
    assert d.code("USER alice") == 331
    assert d.code("PASS wrong") == 530
    assert "login_failed" in d.event_names()
    d.login()
    assert "login" in d.event_names()


def test_too_many_failed_logins_close_the_session(make: Callable[..., Driver]) -> None:
    d = make(max_login_attempts=2)
    for _ in range(2):
        d.code("USER alice")
        last = d.reply("PASS wrong")
    assert last.code == 530 and "too many" in str(last.text) and d.server_closed
    assert "MaxLoginAttempts" in d.event_names()


def test_empty_password_and_root_are_events(make: Callable[..., Driver]) -> None:
    d = make()
    d.code("USER root")
    assert d.code("PASS") == 530
    assert {"EmptyPassword", "RootLogin"} <= set(d.event_names())


def test_anonymous_login_is_read_only(make: Callable[..., Driver], home: object) -> None:
    d = make(anonymous_root=str(home))
    assert "Anonymous" in str(d.reply("USER anonymous").text)
    r = d.reply("PASS me@example.com")
    assert r.code == 230 and "read-only" in str(r.text)
    assert not [a for a in d.actions if type(a).__name__ == "VerifyPassword"]  # no password check
    assert d.code("SIZE f.txt") == 213 and d.code("DELE f.txt") == 550


def test_user_gate_refuses_before_the_password_check(make: Callable[..., Driver]) -> None:
    d = make(user_gate=lambda user, ip: "Banned" if user == "alice" else None)
    d.code("USER alice")
    r = d.reply("PASS s3cret-pw")
    assert (r.code, r.text) == (530, "Banned") and "login_refused" in d.event_names()
    assert not [a for a in d.actions if type(a).__name__ == "VerifyPassword"]


def test_syst_feat_opts_help(drv: Driver) -> None:
    d = drv
    assert d.text("SYST").startswith("215 UNIX")
    feat = d.text("FEAT")
    assert feat.startswith("211")
    for word in ("UTF8", "EPSV", "EPRT", "MLST", "SIZE", "MDTM", "MFMT", "REST STREAM", "HOST", "TVFS"):
        assert word in feat
    assert "AUTH TLS" not in feat  # TLS not configured
    assert d.code("OPTS UTF8 ON") == 200
    assert d.code("OPTS UTF8 OFF") == 504
    assert d.code("OPTS NOPE") == 501
    # OPTS MLST narrows the facts MLST/MLSD return.
    assert d.code("OPTS MLST type;size;") == 200
    (d.home / "m.txt").write_bytes(b"12345")
    mlst = d.text("MLST m.txt")
    assert "type=file;size=5;" in mlst and "modify=" not in mlst
    assert "type*;size*;modify;" in d.text("FEAT")
    helpall = d.text("HELP")
    assert helpall.startswith("214") and "RETR" in helpall and "XPWD" in helpall
    assert d.code("HELP STOR") == 214
    assert d.code("HELP BOGUS") == 502


def test_stat_server_and_path(drv: Driver) -> None:
    d = drv
    st = d.text("STAT")
    assert st.startswith("211") and "Logged in as alice" in st and "Session 1-2-3" in st
    assert "TYPE: BINARY" in st and "Control channel: plain" in st
    (d.home / "d" / "inner.txt").write_bytes(b"x" * 7)
    listing = d.text("STAT d")
    assert listing.startswith("212") and "inner.txt" in listing  # directory status
    assert d.code("STAT d/inner.txt") == 213  # file status
    assert d.code("STAT -la d") == 212  # ls options are ignored
    assert d.code("STAT nope") == 550


def test_type_mode_stru_allo(drv: Driver) -> None:
    d = drv
    for line, want in (("TYPE A", 200), ("TYPE I", 200), ("TYPE L 8", 200), ("TYPE a n", 200), ("TYPE E", 504),
                       ("MODE S", 200), ("MODE B", 504), ("STRU F", 200), ("STRU R", 504), ("ALLO 1000", 202),
                       ("ALLO", 202), ("ALLO x", 202)):  # fmt: skip
        assert d.code(line) == want, line
    d.code("ALLO 1000")
    assert d.s.allo == 1000


def test_pwd_cwd_cdup_mkd_rmd(drv: Driver) -> None:
    d = drv
    assert d.text("PWD") == '257 "/" is the current directory'
    assert d.text("MKD a") == '257 "/a" created'
    assert (d.home / "a").is_dir()
    assert d.code("MKD a/b") == 257
    assert d.code("CWD a/b") == 250
    assert d.text("PWD").startswith('257 "/a/b"')
    assert d.code("CDUP") == 250
    assert d.text("PWD").startswith('257 "/a"')
    assert d.code("CWD /") == 250
    assert d.code("CDUP") == 250  # CDUP at the root stays there
    assert d.text("PWD").startswith('257 "/"')
    assert d.code("CWD nope") == 550
    assert d.code("CWD f.txt") == 550
    assert d.code("RMD a") == 550  # not empty
    assert d.code("RMD a/b") == 250 and d.code("RMD a") == 250
    assert not (d.home / "a").exists()
    assert d.code("RMD /") == 550
    assert d.code("MKD f.txt") == 550  # exists
    assert d.code("MKD nope/x") == 550  # no parent
    assert d.text('MKD q"uote') == '257 "/q""uote" created'  # RFC 959: quotes doubled


def test_x_aliases(drv: Driver) -> None:
    d = drv
    assert d.code("XMKD xd") == 257 and (d.home / "xd").is_dir()
    assert d.code("XCWD xd") == 250
    assert '"/xd"' in d.text("XPWD")
    assert d.code("XCUP") == 250
    assert '"/"' in d.text("XPWD")
    assert d.code("XRMD xd") == 250 and not (d.home / "xd").exists()


def test_dele_rename_size_mdtm_mfmt(drv: Driver) -> None:
    d = drv
    (d.home / "a.txt").write_bytes(b"hello world")
    assert d.text("SIZE a.txt") == "213 11"
    assert d.code("SIZE d") == 550
    assert d.code("SIZE nope") == 550
    assert d.code("RNFR a.txt") == 350
    assert d.code("RNTO d/b.txt") == 250
    assert not (d.home / "a.txt").exists()
    assert (d.home / "d" / "b.txt").read_bytes() == b"hello world"
    rename = [e for e in d.events if e.name == "rename"][-1]
    assert rename.fields == {"source": "/a.txt", "target": "/d/b.txt"}
    assert d.code("RNFR nope") == 550
    assert d.text("MFMT 20200102030405 d/b.txt") == "213 Modify=20200102030405; /d/b.txt"
    assert d.text("MDTM d/b.txt") == "213 20200102030405"
    assert int((d.home / "d" / "b.txt").stat().st_mtime) == 1577934245
    assert d.code("MFMT 20200102030405.5 d/b.txt") == 213
    for bad in ("MFMT 2020 d/b.txt", "MFMT 20201340250000 d/b.txt", "MFMT 20200102030405", "MFMT 2020010203040x f.txt"):
        assert d.code(bad) == 501, bad
    assert d.code("MDTM d") == 550
    assert d.code("DELE d/b.txt") == 250
    assert not (d.home / "d" / "b.txt").exists()
    assert [e.fields for e in d.events if e.name == "delete"] == [{"path": "/d/b.txt", "size": 11}]
    assert d.code("DELE d") == 550  # a directory
    assert d.code("DELE nope") == 550


def test_rename_over_a_file_reports_its_size(drv: Driver) -> None:
    d = drv
    (d.home / "new.txt").write_bytes(b"12345")
    assert d.code("RNFR new.txt") == 350 and d.code("RNTO f.txt") == 250
    assert [e.fields for e in d.events if e.name == "rename"] == [
        {"source": "/new.txt", "target": "/f.txt", "replaced_size": 3}]
    assert d.code("RNFR /") == 550  # the home itself
    assert d.code("RNFR f.txt") == 350 and d.code("RNTO /") == 550


def test_site_chmod_and_help(drv: Driver) -> None:
    d = drv
    p = d.home / "f.txt"
    assert d.code("SITE CHMOD 600 f.txt") == 200
    assert p.stat().st_mode & 0o777 == 0o600
    assert d.code("site chmod 0755 f.txt") == 200
    assert p.stat().st_mode & 0o777 == 0o755
    for bad in ("SITE CHMOD 999 f.txt", "SITE CHMOD 600", "SITE CHMOD 17777 f.txt", "SITE CHMOD x f.txt"):
        assert d.code(bad) == 501, bad
    assert d.code("SITE CHMOD 600 nope") == 550
    (d.home / "trail ").write_bytes(b"t")  # a name that ends in a space (lftp mirror -R chmods it)
    assert d.code("SITE CHMOD 600 trail ") == 200 and (d.home / "trail ").stat().st_mode & 0o777 == 0o600
    assert d.code("SITE HELP") == 214
    assert d.code("SITE NOPE") == 500
    assert d.text("SITE QUOTA").startswith("200-No quota.")


def test_site_help_topics(drv: Driver) -> None:
    d = drv
    assert "CHMOD" in d.text("SITE HELP")
    assert d.text("SITE HELP chmod").startswith("214 CHMOD")
    assert d.code("SITE HELP NOSUCH") == 501
    assert d.code("SITE NOSUCH") == 500


def test_mlst_entry_is_one_space_facts_space_path(drv: Driver) -> None:
    """RFC 3659 section 7.2: ' facts path' with every fact ending in ';'."""
    d = drv
    first, entry, last = d.text("MLST f.txt").split("\n")
    assert first.startswith("250-") and last.startswith("250 ")
    assert entry.startswith(" type=file;size=3;modify=") and entry.endswith("; /f.txt")
    assert not entry.startswith("  ")
    # No facts at all: the space that ends the (empty) facts is still there.
    assert d.text("OPTS MLST") == "200 MLST OPTS"
    assert d.text("MLST f.txt").split("\n")[1] == "  /f.txt"
    assert d.code("OPTS MLST size;") == 200
    assert d.text("MLST f.txt").split("\n")[1] == " size=3; /f.txt"
    assert d.text("MLST").split("\n")[1].endswith(" /")
    assert d.text("MLST d").split("\n")[0] == "250-Listing /d"


def test_size_refused_in_ascii_mode(drv: Driver) -> None:
    """SIZE under TYPE A would have to read the whole file to count line ends: 550,
    as ProFTPD does; binary SIZE is unchanged."""
    d = drv
    assert d.code("TYPE A") == 200
    r = d.reply("SIZE lines.txt")
    assert r.code == 550 and "ASCII" in str(r.text)
    assert d.code("TYPE I") == 200
    assert d.text("SIZE lines.txt") == "213 8"


def test_events_are_event_names(make: Callable[..., Driver]) -> None:
    """The core emits members of the one event enum, never free strings."""
    from ftpcluster.worker.protocol import EventName

    d = make(tls_available=True)
    for line in ("AUTH TLS", "USER root", "PASS", "USER alice", "PASS s3cret-pw", "MKD x", "RNFR x", "RNTO y",
                 "EPSV", "RETR f.txt", "DELE lines.txt", "XYZZY", "\x00"):  # fmt: skip
        d.send(line)
    d.send("GET / HTTP/1.0")
    names = {e.name for e in d.events}
    assert {"TLSHandshake", "user", "EmptyPassword", "RootLogin", "login_failed", "login", "command", "rename",
            "transfer", "delete", "UnhandledCommand", "BadProtocol"} <= names  # fmt: skip
    assert all(type(e.name) is EventName for e in d.events), [e.name for e in d.events if type(e.name) is not EventName]
