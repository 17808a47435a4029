"""An operator's first day: the configuration reference cannot drift from the code,
`config check` catches what `start` would refuse and names the file and the fix,
`user add` keeps the users file's owner and mode, a running server picks up
users-file changes by itself (and survives a broken file), and every
state-changing command says what it did."""

from __future__ import annotations

import ftplib
import grp
import json
import os
import pwd
import re
import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest

from ftpcluster import __version__, config as config_mod
from ftpcluster.config_doc import all_keys, render_init, render_markdown

from .support_server import PASSWORD, Server, cli, make_server, wait_for, write_config

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0


def _service_account() -> tuple[str, str] | None:
    """An unprivileged account and its group that exist here (root only)."""
    for name in ("nobody", "daemon"):
        try:
            pw = pwd.getpwnam(name)
            return name, grp.getgrgid(pw.pw_gid).gr_name
        except KeyError:
            continue
    return None


# ------------------------------------------------------------------ the reference
def test_every_key_is_documented_and_config_init_is_a_valid_config(tmp_path: Path) -> None:
    text = render_init()
    data = tomllib.loads(text)
    for section, key in all_keys():
        assert key in data.get(section, {}), f"config init lacks {section}.{key}: add it to ftpcluster/config_doc.py"
    # The defaults it prints are the defaults config.py uses.
    assert config_mod.from_dict(data).as_dict() == {**config_mod.from_dict({}).as_dict()}
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == render_markdown(), "docs/configuration.md is stale: python -m ftpcluster.config_doc > docs/configuration.md"
    readme = (REPO / "README.md").read_text() + (REPO / "deploy" / "README.md").read_text()
    assert "../shared" not in readme and "docs/configuration.md" in readme
    r = cli("config", "init")
    assert r.returncode == 0 and r.stdout == text


def test_the_example_config_passes_config_check(tmp_path: Path) -> None:
    example = (REPO / "deploy" / "ftpcluster.example.toml").read_text()
    assert config_mod.from_dict(tomllib.loads(example))  # every key in it exists
    # Installed under /etc/ftpcluster it points at /var/lib, /srv and an account: relocate those here.
    text = example.replace("/var/lib/ftpcluster", str(tmp_path / "state")).replace("/srv/ftp", str(tmp_path / "ftp"))
    text = text.replace("/var/log/ftpcluster/", str(tmp_path) + "/")
    text = re.sub(r'(?m)^user = ".*"', 'user = ""', text)
    cfg = tmp_path / "ftpcluster.toml"
    cfg.write_text(text)
    assert cli("cert", "generate", "--out", str(tmp_path), config=cfg).returncode == 0
    r = cli("key", "generate", config=cfg)
    assert r.returncode == 0 and "fingerprint" in r.stdout, r.stdout + r.stderr
    r = cli("config", "check", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "OK, every check start runs passed" in r.stdout


# ------------------------------------------------------------------ config check
def test_config_check_names_the_file_and_the_fix(tmp_path: Path) -> None:
    srv = make_server(tmp_path / "a", tls={"session_cache": "memcache", "session_tickets": "cluster"})
    cert = srv.dir / "certs" / "cert.pem"
    cert.rename(srv.dir / "certs" / "moved.pem")
    r = cli("config", "check", config=srv.config)
    assert r.returncode == 1
    assert f"[tls] certificate {cert}: not found" in r.stderr and "ftpcluster cert generate --out" in r.stderr, r.stderr
    assert "session_key_file" in r.stderr and str(srv.dir / "session.key") in r.stderr and "ftpcluster key generate" in r.stderr
    # start refuses it with the same line (the same code runs).
    started = cli("start", "--daemon", config=srv.config)
    assert started.returncode == 1 and f"[tls] certificate {cert}: not found" in started.stderr, started.stderr
    # --json: the problems as data
    j = json.loads(cli("config", "check", "--json", config=srv.config).stdout)
    assert j["ok"] is False and len(j["problems"]) == 2
    # A users file that does not parse is named too.
    (srv.dir / "certs" / "moved.pem").rename(cert)
    assert cli("key", "generate", config=srv.config).returncode == 0
    users = srv.dir / "users.toml"
    users.write_text("[[users]\nname = ")
    r = cli("config", "check", config=srv.config)
    assert r.returncode == 1 and f"[server] users_file: bad users file {users}" in r.stderr, r.stderr
    # A name as masquerade_address would make every PASV reply unreadable ("lb,example,com,...").
    from ftpcluster import config as config_mod

    for bad in ("lb.example.com", "2001:db8::1"):
        with pytest.raises(config_mod.ConfigError, match="masquerade_address: an IPv4 address"):
            config_mod.from_dict({"server": {"masquerade_address": bad}}, tmp_path / "m.toml")
    assert config_mod.from_dict({"server": {"masquerade_address": "203.0.113.7"}}, tmp_path / "m.toml")


def _problems(config: Path) -> list[str]:
    """What `config check` reports, in-process (the CLI path is covered above)."""
    from ftpcluster.supervisor.preflight import problems

    return problems(config_mod.load(str(config)), create=False)


@pytest.mark.skipif(not ROOT or _service_account() is None, reason="needs root and an unprivileged account")
def test_config_check_reads_files_as_the_service_user(tmp_path: Path) -> None:
    account, group = _service_account()  # type: ignore[misc]
    base = Path(tempfile.mkdtemp(prefix="ftpcluster-operator-", dir="/tmp"))  # pytest's folders are 0700
    try:
        _as_service_user(base, account, group)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _as_service_user(base: Path, account: str, group: str) -> None:
    gid = grp.getgrnam(group).gr_gid
    srv = make_server(base / "b", tls=True, server={"user": account},
                      log={"level": "info", "format": "json", "xferlog": "logs/xfer.log"})  # fmt: skip
    users, key = srv.dir / "users.toml", srv.dir / "certs" / "key.pem"
    (srv.dir / "logs").mkdir()
    for p in (srv.dir, srv.dir / "certs", srv.dir / "logs"):
        p.chmod(0o755)
    found = "\n".join(_problems(srv.config))
    assert f"the folder {base} is closed to it" in found, found  # mkdtemp made it 0700
    base.chmod(0o755)
    assert users.stat().st_mode & 0o777 == 0o600  # a new users file is owner-only (root here)
    r = cli("config", "check", config=srv.config)
    assert r.returncode == 1
    assert f"[server] users_file {users}: not readable by the service user {account}" in r.stderr, r.stderr
    assert f"chgrp {group} {users}; chmod 0640 {users}" in r.stderr
    assert f"[tls] private_key {key}: not readable" in r.stderr
    # The nodes write the xferlog as the service user (a root-owned folder failed their boot).
    assert f"[log] xferlog {srv.dir / 'logs' / 'xfer.log'}: not writable by the service user {account}" in r.stderr
    for p in (users, key):
        os.chown(p, 0, gid)
        p.chmod(0o640)
    os.chown(srv.dir / "logs", pwd.getpwnam(account).pw_uid, gid)
    assert _problems(srv.config) == []
    # user add keeps that owner, group and mode, and the new home belongs to the service user.
    home = srv.dir / "homes" / "bob"
    r = cli("user", "add", "bob", "--home", str(home), "--password-stdin", config=srv.config, input="pw-bob\n")
    assert r.returncode == 0 and r.stdout.startswith("added user bob"), r.stdout + r.stderr
    st = users.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o640)
    assert home.stat().st_uid == pwd.getpwnam(account).pw_uid
    assert _problems(srv.config) == []


def test_user_add_keeps_mode_and_group(tmp_path: Path) -> None:
    from ftpcluster.users import add_user, del_user, set_password

    config = tmp_path / "ftpcluster.toml"
    write_config(config, {"server": {"users_file": "users.toml"}, "tls": {"enabled": False}})
    users = tmp_path / "users.toml"
    add_user(users, "alice", "pw", str(tmp_path / "homes" / "alice"))
    gid = next((g for g in os.getgroups() if g != os.getegid()), None) if not ROOT else grp.getgrnam("nogroup").gr_gid if _has_group("nogroup") else 1
    if gid is not None:
        os.chown(users, -1, gid)
    users.chmod(0o640)
    before = users.stat()
    r = cli("user", "add", "carol", "--home", str(tmp_path / "homes" / "carol"), "--password-stdin", config=config, input="pw\n")
    assert r.returncode == 0, r.stderr
    for change in (lambda: None, lambda: set_password(users, "carol", "pw2"), lambda: del_user(users, "carol")):
        change()
        after = users.stat()
        assert (after.st_uid, after.st_gid, after.st_mode & 0o7777) == (before.st_uid, before.st_gid, 0o640)
    assert after.st_ino != before.st_ino  # replaced (temp file + rename), never rewritten in place


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


# ------------------------------------------------------------------ a running server
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):  # -> Server
    srv = make_server(tmp_path_factory.mktemp("operator"), log={"file": "server.log"})  # = srv.log
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    r = cli("start", "--daemon", "--nodes", "2", config=srv.config, env=env)
    assert r.returncode == 0, r.stderr
    assert re.match(r"started: supervisor pid \d+, 2 nodes accepting on 127\.0\.0\.1:\d+\n$", r.stdout), r.stdout
    try:
        yield srv
    finally:
        r = cli("stop", config=srv.config)
        assert r.returncode == 0 and r.stdout.startswith("stopped (supervisor pid "), r.stdout + r.stderr


def _login(srv: Server, user: str, password: str) -> bool:
    try:
        f = ftplib.FTP(timeout=5)
        f.connect(srv.host, srv.port)
        try:
            f.login(user, password)
            return True
        finally:
            f.close()
    except ftplib.error_perm:
        return False


def test_users_file_changes_apply_without_reload(daemon: Server) -> None:
    srv = daemon
    users = srv.dir / "users.toml"
    r = cli("user", "add", "dave", "--home", str(srv.dir / "homes" / "dave"), "--password-stdin", config=srv.config, input="pw-dave\n")
    assert r.returncode == 0 and "running servers use it within 2 s" in r.stdout, r.stdout
    assert wait_for(lambda: _login(srv, "dave", "pw-dave"), timeout=8, step=0.3), "a user added while the server runs cannot log in"
    # Several nodes: each one reloads by itself, so every new session works.
    assert all(_login(srv, "dave", "pw-dave") for _ in range(4))
    # A broken users file is logged and the users the nodes have stay.
    good = users.read_text()
    users.write_text(good + "\n[[users\n")
    try:
        assert wait_for(lambda: srv.logs().count("users file not reloaded") >= 2, timeout=8, step=0.2), srv.logs()[-2000:]
        assert _login(srv, "dave", "pw-dave") and _login(srv, srv.user, PASSWORD)
    finally:
        users.write_text(good)
    r = cli("user", "del", "dave", config=srv.config)
    assert r.returncode == 0 and r.stdout.startswith("deleted user dave")
    assert wait_for(lambda: not _login(srv, "dave", "pw-dave"), timeout=8, step=0.3)
    r = cli("user", "list", "--json", config=srv.config)
    assert [u["name"] for u in json.loads(r.stdout)] == [srv.user]


def test_state_changing_commands_say_what_they_did(daemon: Server) -> None:
    srv = daemon
    r = cli("ban", "host", "127.0.0.5", "--for", "10m", config=srv.config)
    assert (r.returncode, r.stdout) == (0, "banned host 127.0.0.5 for 10m on this host\n"), r.stderr
    r = cli("permit", "host", "127.0.0.5", config=srv.config)
    assert (r.returncode, r.stdout) == (0, "permitted host 127.0.0.5 on this host\n"), r.stderr
    r = cli("permit", "host", "127.0.0.5", config=srv.config)
    assert r.returncode == 1 and r.stdout == "" and r.stderr == "ftpcluster: host 127.0.0.5 is not banned (see: ftpcluster bans)\n"
    r = cli("ban", "user", "mallory", config=srv.config)
    assert r.stdout == "banned user mallory permanently on this host\n"
    assert cli("permit", "user", "mallory", config=srv.config).returncode == 0
    r = cli("reload", config=srv.config)
    assert r.returncode == 0 and r.stdout.startswith("reloaded: generation 2 accepting"), r.stdout + r.stderr
    # What a reload cannot apply is said where the operator looks, not only in the log.
    text = srv.config.read_text()
    srv.config.write_text(text.replace(f"127.0.0.1:{srv.port}", f"127.0.0.1:{srv.port + 1}"))
    try:
        r = cli("reload", config=srv.config)
    finally:
        srv.config.write_text(text)
    assert r.returncode == 0 and "listen addresses changed: they take effect at the next restart" in r.stdout, r.stdout
    srv.ftp().quit()  # still on the old address
    r = cli("user", "del", "nobody-here", config=srv.config)
    assert r.returncode == 1 and r.stderr.startswith("ftpcluster: no such user: nobody-here")


def test_version_and_usage_errors() -> None:
    r = cli("--version")
    assert (r.returncode, r.stdout) == (0, f"ftpcluster {__version__}\n")
    r = cli("permit", "host")
    assert r.returncode == 2


def test_cluster_check_reports_a_different_key_and_a_lone_host(tmp_path: Path) -> None:
    from ftpcluster.cluster_check import check_hosts

    from ftpcluster.certs import generate_session_key
    from ftpcluster.cluster.host_registry import key_fingerprint

    config = tmp_path / "ftpcluster.toml"
    write_config(config, {"tls": {"session_key_file": "session.key"}})
    generate_session_key(tmp_path / "session.key")
    cfg = config_mod.load(str(config))

    mine = key_fingerprint(cfg)
    hosts = [{"host": "a", "address": "10.0.0.11", "port": 21, "key": mine}, {"host": "b", "address": "10.0.0.12", "port": 21, "key": "0123456789ab"}]
    results = {r.check: r for r in check_hosts(cfg, hosts, expect=3)}
    assert not results["hosts"].ok and "expected 3" in results["hosts"].detail
    assert not results["session keys"].ok and "b has 0123456789ab" in results["session keys"].detail
    assert all(r.ok for r in check_hosts(cfg, hosts[:1], expect=1))
    none = {r.check: r for r in check_hosts(cfg, [], expect=0)}  # no host: nothing was compared
    assert not none["hosts"].ok and not none["session keys"].ok, none
    # Without memcached there is no cluster to check: exit 1, said plainly.
    r = cli("cluster", "check", config=config)
    assert r.returncode == 1 and "[memcache] enabled = false" in r.stdout


def test_console_logs_on_a_terminal() -> None:
    import subprocess
    import sys

    code = "from ftpcluster import config as c; print(c.from_dict({}).log.format, c.from_dict({'log': {'format': 'json'}}).log.format)"
    master, slave = os.openpty()
    try:
        r = subprocess.run([sys.executable, "-c", code], stderr=slave, stdout=subprocess.PIPE, text=True, cwd=str(REPO), timeout=30)
    finally:
        os.close(slave)
        os.close(master)
    assert r.stdout.split() == ["console", "json"]  # a terminal gets console text unless the file says json
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=30)
    assert r.stdout.split() == ["json", "json"]
