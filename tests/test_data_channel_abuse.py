"""The data channel under slow networks and careless clients, over real sockets
against one module-scoped server (data_timeout 2 s):

- readers at 64 KB/s and 1 MB/s get whole files, on the event-loop sendfile path
  and on the threaded one: data_timeout means "no byte moved", not "took long";
- an unused PASV/EPSV port comes back after data_timeout, and one address cannot
  hold more than max_passive_per_host of them;
- strangers connecting to someone's passive port are closed; the owner's
  transfer still works;
- 100 commands pipelined behind PASS (and behind PASV) all get their replies;
- odd Unicode digits in REST/PORT/EPRT get 501 and the session goes on;
- DELE/RMD/RNFR act on a symlink itself; listings show links leaving the home as links."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from .support_server import Server, make_server, wait_for
from .test_bad_input import LINKS, Raw, node_pid

DATA_TIMEOUT = 2.0
THREAD_MIN = 1 << 20  # FTPCLUSTER_SENDFILE_THREAD_MIN for this server: 1 MB files take the threaded path
BLOCK = 1 << 20  # FTPCLUSTER_SENDFILE_BLOCK: ... in 1 MB sendfile calls, so a 2.5 MB file spans three
ENV = {"FTPCLUSTER_SENDFILE_THREAD_MIN": str(THREAD_MIN), "FTPCLUSTER_SENDFILE_BLOCK": str(BLOCK)}
PASSIVE_PER_HOST = 4


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = make_server(tmp_path_factory.mktemp("abuse"), server={
        "data_timeout": f"{DATA_TIMEOUT}s", "max_passive_per_host": PASSIVE_PER_HOST})  # fmt: skip
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        s.start(nodes=1)
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    s.home.mkdir(parents=True, exist_ok=True)
    pid = node_pid(s)
    yield s
    assert node_pid(s) == pid, "the node process was replaced: the worker crashed"
    s.stop()


def _slow_read(sock: socket.socket, rate: float, limit: float) -> bytes:
    """Read at about `rate` bytes/s (small receive buffer, like a slow link)."""
    got = bytearray()
    start = time.monotonic()
    sock.settimeout(limit)
    while time.monotonic() - start < limit:
        ahead = start + len(got) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(min(ahead, 0.05))
            continue
        chunk = sock.recv(8192)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def _epsv_socket(c: Raw, rcvbuf: int = 0) -> socket.socket:
    code, text = c.reply_to("EPSV")
    assert code == 229, text
    port = int(text.split(b"|")[3])
    d = socket.socket()
    if rcvbuf:
        d.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    d.connect(("127.0.0.1", port))
    return d


def test_slow_readers_get_whole_files(srv: Server) -> None:
    """64 KB/s over the loop path (160 KB file) and 1 MB/s over the threaded sendfile path
    (2.5 MB, larger than the 1 MB sendfile block: three calls, each blocking while the
    reader drains it): each takes about 2.5 s, longer than data_timeout, and neither is cut."""
    files = {"small.bin": (160 << 10, 64 << 10), "big.bin": (THREAD_MIN * 5 // 2, 1 << 20)}
    for name, (size, _) in files.items():
        (srv.home / name).write_bytes(os.urandom(1024) * (size // 1024))
    results: dict[str, tuple[int, int, bytes]] = {}

    def fetch(name: str, rate: int) -> None:
        c = Raw(srv, timeout=20)
        c.login()
        assert c.cmd("TYPE I") == 200
        d = _epsv_socket(c, rcvbuf=16384)
        assert c.cmd(f"RETR {name}") == 150
        got = _slow_read(d, rate, limit=15)
        d.close()
        results[name] = (len(got), *c.reply())
        c.close()

    threads = [threading.Thread(target=fetch, args=(n, r)) for n, (_, r) in files.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name, (size, _) in files.items():
        n, code, text = results[name]
        assert (n, code) == (size, 226), (name, n, text)


def test_watchdog_sees_a_slow_reader_inside_one_sendfile_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server process: the threaded sendfile path (THREAD_MIN forced to 0) sends a
    96 KB file in one blocking call (datastream.BLOCK is far bigger) to a 64 KB/s
    reader, about 1.5 s, under a 0.6 s data timeout. The watchdog must see the bytes the
    reader takes (kernel counters) although the call has not returned yet."""
    import asyncio

    from ftpcluster.worker import datastream
    from ftpcluster.worker.datachannel import CHUNK, _watch

    size = 96 << 10
    assert datastream.BLOCK > size
    monkeypatch.setattr(datastream, "THREAD_MIN", 0)
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(size))
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        reader.connect(ls.getsockname())
        sender, _ = ls.accept()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    sender.setblocking(False)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(_slow_read(reader, 64 << 10, limit=10)))
    t.start()

    async def send() -> int:
        stream = datastream.PlainStream(sender, asyncio.get_running_loop())
        with open(path, "rb") as f:
            n = await _watch(stream.send_file(f.fileno(), 0, CHUNK), stream, 0.6)
        await stream.close()
        return n

    try:
        sent = asyncio.run(send())
    finally:
        t.join(15)
        reader.close()
    assert sent == size and len(got[0]) == size


def test_unused_passive_ports_come_back(srv: Server) -> None:
    """PASV/EPSV nobody uses: closed after data_timeout. One address holds at most
    max_passive_per_host listeners on a node (425 beyond), however many sessions it opens."""
    hoarders = [Raw(srv) for _ in range(PASSIVE_PER_HOST + 1)]
    ports = []
    for c in hoarders:
        c.login()
    for c in hoarders[:PASSIVE_PER_HOST]:
        code, text = c.reply_to("EPSV")
        assert code == 229, text
        ports.append(int(text.split(b"|")[3]))
    last = hoarders[-1]
    code, text = last.reply_to("EPSV")
    assert code == 425 and b"from your address" in text, text
    # NOOP keeps the sessions alive, not their ports.
    assert wait_for(lambda: last.cmd("NOOP") == 200 and last.reply_to("EPSV")[0] == 229, timeout=DATA_TIMEOUT + 6)

    def closed(port: int) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) != 0

    assert all(closed(p) for p in ports)
    # The session that held an expired port is told to ask again, and can.
    assert hoarders[0].cmd("RETR nothing") in (425, 550)
    assert hoarders[0].cmd("NOOP") == 200
    for c in hoarders:
        c.close()


def test_strangers_do_not_abort_the_owner(srv: Server) -> None:
    """32 connections from another address (127.0.0.2) to the owner's passive port are
    closed; the owner then connects and gets the file."""
    (srv.home / "mine.txt").write_bytes(b"mine" * 1000)
    c = Raw(srv)
    c.login()
    code, text = c.reply_to("EPSV")
    assert code == 229, text
    port = int(text.split(b"|")[3])
    refused = 0
    for _ in range(32):
        s = socket.socket()
        s.settimeout(5)
        s.bind(("127.0.0.2", 0))
        try:
            s.connect(("127.0.0.1", port))
            refused += s.recv(10) == b""  # closed by the server, nothing sent
        except OSError:
            refused += 1
        finally:
            s.close()
    assert refused == 32
    assert c.cmd("TYPE I") == 200
    assert _passive_retr(c, port, "mine.txt") == b"mine" * 1000
    c.close()


def test_pipelined_commands_all_answered(srv: Server) -> None:
    """100 commands behind PASS, then 100 behind PASV, in one send each: 102 and 101 replies."""
    c = Raw(srv)
    c.send(f"USER {srv.user}\r\nPASS {srv.password}\r\n".encode() + b"PWD\r\n" * 100)
    codes = [c.reply()[0] for _ in range(102)]
    assert codes == [331, 230] + [257] * 100
    c.send(b"EPSV\r\n" + b"TYPE I\r\n" * 100)
    codes = [c.reply()[0] for _ in range(101)]
    assert codes == [229] + [200] * 100
    assert c.cmd("NOOP") == 200
    c.close()


def test_symlinks_act_on_the_link(srv: Server) -> None:
    """DELE/RNFR/RMD act on a symlink itself, never on its target; a listing shows a link
    that leaves the home as a link (its own lstat), never the target's size or mode."""
    node, home = srv, srv.home / "links"
    outside = srv.dir / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    (home / "sub").mkdir(parents=True)
    (home / "out_link").symlink_to(outside)
    (home / "file_link").symlink_to(outside / "secret.txt")
    (home / "dangling_out").symlink_to(outside / "does-not-exist")
    (home / "in_link").symlink_to(home / "sub")
    (home / "victim.txt").write_bytes(b"inside target")
    (home / "in_file_link").symlink_to(home / "victim.txt")
    c = Raw(node)
    c.login()
    assert c.cmd("CWD links") == 250
    # LIST/MLSD/STAT: the 6-byte secret behind file_link and the folder behind out_link stay hidden.
    body = _listing(c, "LIST").decode()
    rows = {line.split()[-1]: line for line in body.splitlines()}
    for name in LINKS:
        assert rows[name].startswith("l"), rows[name]
    assert " 6 " not in rows["file_link"] and rows["in_file_link"].startswith("-"), rows
    facts = {line.split("; ", 1)[1]: line for line in _listing(c, "MLSD").decode().splitlines()}
    assert all("type=OS.unix=symlink" in facts[name] for name in LINKS), facts
    assert "size=6;" not in facts["file_link"] and "type=file" in facts["in_file_link"]
    code, text = c.reply_to("STAT .")
    assert code == 212 and b" 6 " not in [ln for ln in text.split(b"\n") if ln.endswith(b"file_link")][0]  # 212: directory status
    # DELE removes the link, inside or out; the target stays.
    assert c.cmd("DELE in_file_link") == 250
    assert c.cmd("DELE file_link") == 250
    assert (home / "victim.txt").read_bytes() == b"inside target"
    assert (outside / "secret.txt").read_bytes() == b"secret"
    assert not os.path.lexists(home / "in_file_link") and not os.path.lexists(home / "file_link")
    # RMD of a link to a directory: refused (not a directory); the directory stays.
    assert c.cmd("RMD in_link") == 550 and (home / "sub").is_dir()
    # RNFR/RNTO rename the link; the renamed link still cannot be followed out.
    assert c.cmd("RNFR dangling_out") == 350
    assert c.cmd("RNTO moved_link") == 250
    assert os.readlink(home / "moved_link") == str(outside / "does-not-exist")
    assert c.cmd("RETR moved_link") == 550
    c.close()


def _transfer_over(c: Raw, data: socket.socket, cmd: str) -> bytes:
    """`cmd` with its data connection `data`: the bytes, after 150 and 226."""
    assert c.cmd(cmd) == 150
    body = b""
    while chunk := data.recv(65536):
        body += chunk
    data.close()
    assert c.reply()[0] == 226
    return body


def _listing(c: Raw, cmd: str) -> bytes:
    return _transfer_over(c, c.pasv(), cmd)


def test_odd_digits_get_501(srv: Server) -> None:
    c = Raw(srv)
    c.login()
    for line in ("REST ²", "PORT 127,0,0,1,²,1", "EPRT |1|127.0.0.1|²|"):
        assert c.cmd(line.encode()) == 501, line
    assert c.cmd("NOOP") == 200
    c.close()


def _passive_retr(c: Raw, port: int, name: str) -> bytes:
    """RETR `name` over a connection to the passive `port`."""
    return _transfer_over(c, socket.create_connection(("127.0.0.1", port), timeout=10), f"RETR {name}")


def _refused(port: int) -> bool:
    """Nothing listens on `port` (a connection still queued there, or one that times out
    on a full queue, means something does)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        pass
    return False


def test_small_retr_keeps_its_passive_port_for_the_next_epsv(srv: Server) -> None:
    """After a small RETR the plain listener stays for the session's next EPSV (the same
    port, no new socket); a connection left in its queue meanwhile is closed at that
    EPSV, never sent the file; a kept listener no EPSV takes is closed by a sweep."""
    (srv.home / "kept.txt").write_bytes(b"k" * 1000)
    c = Raw(srv)
    c.login()
    assert c.cmd("TYPE I") == 200

    def epsv() -> int:
        code, text = c.reply_to("EPSV")
        assert code == 229, text
        return int(text.split(b"|")[3])

    first = epsv()
    assert _passive_retr(c, first, "kept.txt") == b"k" * 1000
    stale = socket.create_connection(("127.0.0.1", first), timeout=10)  # queued on the kept listener
    assert epsv() == first
    assert stale.recv(10) == b""  # closed at the EPSV: nobody waits on it
    stale.close()
    assert _passive_retr(c, first, "kept.txt") == b"k" * 1000
    assert wait_for(lambda: _refused(first), timeout=10, step=0.5), "kept listener still open"
    c.close()


def test_kept_listeners_give_way_to_a_new_epsv_at_the_per_host_limit(srv: Server) -> None:
    """Sessions of one address that each kept their listener after a small RETR hold
    max_passive_per_host ports; another session's EPSV then closes those kept
    listeners instead of answering 425 (a reuse that may never come does not block a
    transfer that is asked for now)."""
    (srv.home / "kept2.txt").write_bytes(b"q" * 1000)
    keepers = [Raw(srv) for _ in range(PASSIVE_PER_HOST)]
    ports = []
    for c in keepers:
        c.login()
        code, text = c.reply_to("EPSV")
        assert code == 229, text
        ports.append(int(text.split(b"|")[3]))
        assert _passive_retr(c, ports[-1], "kept2.txt") == b"q" * 1000  # its listener is kept
    new = Raw(srv)
    new.login()
    code, text = new.reply_to("EPSV")
    assert code == 229, text  # not 425: the kept listeners were released
    port = int(text.split(b"|")[3])
    assert _passive_retr(new, port, "kept2.txt") == b"q" * 1000
    # The keepers' next EPSV gets a fresh listener; their sessions go on.
    for c in keepers:
        code, text = c.reply_to("EPSV")
        assert code in (229, 425), text
        assert c.cmd("NOOP") == 200
    for c in [*keepers, new]:
        c.close()


def test_upload_onto_a_fifo_is_refused_and_the_node_keeps_serving(srv: Server) -> None:
    """A FIFO in a home (made outside FTP): STOR, APPE and REST+STOR onto it get 550
    before any data connection is used; opening it for writing would block the
    node's event loop until a reader came (the supervisor then killed the node)."""
    fifo = srv.home / "pipe"
    os.mkfifo(fifo)
    try:
        c, other = Raw(srv), Raw(srv)
        c.login()
        other.login()
        for cmds in (["STOR pipe"], ["APPE pipe"], ["REST 0", "STOR pipe"]):
            c.pasv().close()
            for line in cmds[:-1]:
                assert c.cmd(line) == 350
            code, text = c.reply_to(cmds[-1])
            assert code == 550 and b"regular file" in text, (cmds, code, text)
        assert other.cmd("NOOP") == 200  # the node's loop never blocked
        assert c.cmd("NOOP") == 200
        c.close()
        other.close()
    finally:
        fifo.unlink()


def test_upload_open_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    """The I/O layer's own guard, for a FIFO swapped in after the core's check: the
    open does not wait for a reader, and the FIFO is refused (PathError: 550)."""
    from ftpcluster.worker.datachannel import _open_for_upload
    from ftpcluster.worker.fs import PathError
    from ftpcluster.worker.protocol import Transfer

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    appe, rest = Transfer("receive_file", path=str(fifo), append=True), Transfer("receive_file", path=str(fifo), offset=3)
    for t in (appe, rest):  # no reader: open(2) itself says no (ENXIO)
        with pytest.raises(PathError):
            _open_for_upload(t)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for t in (appe, rest):  # a reader: the open succeeds, the file type refuses it
            with pytest.raises(PathError):
                _open_for_upload(t)
    finally:
        os.close(reader)
