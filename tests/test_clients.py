"""Real command-line clients against the server: curl (upload, download, listing,
resume both ways, PASV/EPSV/active) and lftp `mirror` both ways over a tree with
spaces and non-ASCII names. Files are compared by sha256. Skipped when a tool
is missing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from .support_server import Server, needs, wait_for

ENV = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/tmp")}

needs_curl = needs("curl")
needs_lftp = needs("lftp")

TREE = {
    "top.bin": 1_000_003,
    "empty.txt": 0,
    "dir with space/ünïcødé 文件.txt": 12_345,
    "dir with space/sub dir/ä b ç.bin": 300_000,
    "dir with space/sub dir/deeper/x.txt": 10,
    "文件夹/数据 1.dat": 65_536,
    "quote's & semi;colon.txt": 77,
}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def make_tree(root: Path) -> dict[str, str]:
    for rel, size in TREE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    (root / "empty dir").mkdir(exist_ok=True)
    return tree_hashes(root)


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(["curl", "-sS", "--max-time", "50", *args], capture_output=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, (args, r.returncode, r.stderr.decode(errors="replace"))
    return r


def transfers(server: Server) -> list[dict]:
    """The server's transfer log events (JSON lines)."""
    out = []
    for line in server.logs().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "transfer":
            out.append(e)
    return out


def url(server: Server, path: str) -> str:
    return server.url(quote(path))


@pytest.fixture(scope="module")
def server(module_server_factory) -> Server:
    """One server for the module: every test uses its own paths in the home."""
    return module_server_factory()


# ---------------------------------------------------------------- curl
@needs_curl
def test_curl_upload_download_list(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(500_000))
    remote = "/d ü/f 文件.bin"
    curl("--ftp-create-dirs", "-T", str(src), url(server, remote))
    assert sha(server.home / "d ü" / "f 文件.bin") == sha(src)
    # Download over EPSV (curl's default), PASV, and active mode (PORT/EPRT).
    for extra in ([], ["--disable-epsv"], ["-P", "127.0.0.1"], ["-P", "127.0.0.1", "--disable-eprt"]):
        out = tmp_path / "out.bin"
        curl(*extra, "-o", str(out), url(server, remote))
        assert sha(out) == sha(src), extra
        out.unlink()
    listing = curl(url(server, "/d ü/")).stdout.decode()
    assert "f 文件.bin" in listing and "500000" in listing
    names = curl("--list-only", url(server, "/d ü/")).stdout.decode().splitlines()
    assert "f 文件.bin" in names
    # A quoted command after the transfer: curl -Q runs DELE.
    curl("-Q", "-DELE f 文件.bin", "--list-only", url(server, "/d ü/"))
    assert not (server.home / "d ü" / "f 文件.bin").exists()


@needs_curl
def test_curl_resume_download(server: Server, tmp_path: Path) -> None:
    data = os.urandom(2_000_000)
    (server.home / "big file.bin").write_bytes(data)
    out = tmp_path / "part.bin"
    out.write_bytes(data[:700_000])
    curl("-C", "-", "-o", str(out), url(server, "/big file.bin"))
    assert out.read_bytes() == data
    # log lines are written in batches (up to 50 ms late): wait for this one
    sent = wait_for(lambda: [e for e in transfers(server) if e.get("path") == "/big file.bin"])
    assert sent and sent[-1]["bytes"] == 1_300_000  # resumed, not downloaded again
    # An explicit offset too.
    out2 = tmp_path / "tail.bin"
    curl("-C", "1999000", "-o", str(out2), url(server, "/big file.bin"))
    assert out2.read_bytes() == data[1_999_000:]


@needs_curl
def test_curl_resume_upload_and_append(server: Server, tmp_path: Path) -> None:
    data = os.urandom(2_000_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    (server.home / "up.bin").write_bytes(data[:900_000])  # an upload that was cut off
    curl("-C", "-", "-T", str(src), url(server, "/up.bin"))
    assert (server.home / "up.bin").read_bytes() == data
    sent = wait_for(lambda: [e for e in transfers(server) if e.get("path") == "/up.bin"])
    assert sent and sent[-1]["bytes"] == 1_100_000  # only the missing part crossed the wire
    (server.home / "log.txt").write_bytes(b"first\n")
    more = tmp_path / "more.txt"
    more.write_bytes(b"second\n")
    curl("--append", "-T", str(more), url(server, "/log.txt"))
    assert (server.home / "log.txt").read_bytes() == b"first\nsecond\n"


# ---------------------------------------------------------------- lftp
def lftp(server: Server, script: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    settings = (
        "set cmd:fail-exit yes; set ftp:ssl-allow no; set net:max-retries 2; set net:timeout 15; "
        "set net:reconnect-interval-base 1; set ftp:passive-mode yes; set ftp:charset utf-8; "
        "set file:charset utf-8; "
    )
    try:
        r = _run_lftp(server, settings + script, timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"lftp timed out: {e.stdout!r} {e.stderr!r}")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def _run_lftp(server: Server, script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["lftp", "-u", f"{server.user},{server.password}", "-p", str(server.port), "-e", script + "; bye",
         server.host],
        capture_output=True, text=True, timeout=timeout, env=ENV, stdin=subprocess.DEVNULL,
    )


@needs_lftp
def test_lftp_mirror_upload(server: Server, tmp_path: Path) -> None:
    local = tmp_path / "client" / "local tree"
    want = make_tree(local)
    lftp(server, f'mirror -R "{local}" "/up loaded"')
    got_root = server.home / "up loaded"
    assert tree_hashes(got_root) == want
    assert (got_root / "empty dir").is_dir()
    assert not [p for p in got_root.rglob(".ftpcluster-upload.*")]


@needs_lftp
def test_lftp_mirror_download(server: Server, tmp_path: Path) -> None:
    want = make_tree(server.home / "srv tree")
    local = tmp_path / "client" / "downloaded"
    lftp(server, f'mirror "/srv tree" "{local}"')
    assert tree_hashes(local) == want
    assert (local / "empty dir").is_dir()
    # A second mirror has nothing to do and changes nothing.
    lftp(server, f'mirror "/srv tree" "{local}"')
    assert tree_hashes(local) == want


@needs_lftp
def test_lftp_mirror_round_trip_active_mode(server: Server, tmp_path: Path) -> None:
    local = tmp_path / "client" / "src"  # not under tmp_path / "a": that is the server's own folder
    back = tmp_path / "client" / "back"
    want = make_tree(local)
    lftp(server, f'set ftp:passive-mode no; mirror -R "{local}" /rt; mirror /rt "{back}"')
    assert tree_hashes(server.home / "rt") == want
    assert tree_hashes(back) == want
