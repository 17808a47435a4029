"""PROXY protocol receiver for a node: read the header from the raw accepted socket
before anything else happens on it (no banner, no TLS): the node asks its
`ProxyReceiver` on the control and implicit-TLS listeners and, when
`[proxy_protocol] passive`, its data channels on the passive ones.

Only peers in `trusted` may (and then must) send a header; from anyone else no
header is read, so an untrusted peer's header is just a bad FTP command. Reads
take exactly the header's bytes (exact sizes for v2, MSG_PEEK up to the LF for
v1): the FTP command or TLS ClientHello behind it stays in the kernel buffer."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any, Callable

from ..config import ProxyProtocolConfig
from ..logs import enabled, get_logger
from .proxy_protocol import MAX_V2_LENGTH, NeedMore, ProxyError, ProxyHeader, ProxyParser

log = get_logger("proxy")

ProxyResult = ProxyHeader  # what read_proxy_header gives back
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _read_step(loop: asyncio.AbstractEventLoop, sock: socket.socket, step: NeedMore) -> bytes:
    """At most what `step` allows; b"" at EOF."""
    while True:
        try:
            if step.line:
                peek = sock.recv(step.limit, socket.MSG_PEEK)
                if not peek:
                    return b""
                nl = peek.find(b"\n")
                return sock.recv(nl + 1 if nl >= 0 else len(peek))
            return sock.recv(step.safe)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)


async def receive_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float, max_length: int = MAX_V2_LENGTH
) -> ProxyHeader:
    """The header, read exactly. Raises ProxyError (malformed), TimeoutError, ConnectionError (EOF)."""
    parser = ProxyParser(max_length)
    async with asyncio.timeout(timeout):
        while True:
            data = await _read_step(loop, sock, parser.next_step())
            if not data:
                raise ConnectionError("closed before a complete PROXY header")
            got = parser.feed(data)
            if isinstance(got, ProxyHeader):
                return got


async def read_proxy_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float = 3.0, max_length: int = MAX_V2_LENGTH
) -> ProxyResult | None:
    """The header from a raw non-blocking socket within `timeout`, or None (logged why)."""
    try:
        return await receive_header(loop, sock, timeout, max_length)
    except (ProxyError, TimeoutError, OSError) as e:
        log.info("PROXY header rejected", reason=_reason(e), error=str(e) or type(e).__name__)
        return None


def _reason(e: BaseException) -> str:
    if isinstance(e, ProxyError):
        return "malformed"
    if isinstance(e, TimeoutError):
        return "timeout"
    return "closed"


def parse_trusted(cidrs: list[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def plain_ip(ip: str) -> str:
    """'::ffff:1.2.3.4' -> '1.2.3.4', so bans and logs see one spelling."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        return str(a.ipv4_mapped)
    return str(a)


class ProxyReceiver:
    """Trusted-peer policy, header reading and counters (attributes, for metrics)."""

    def __init__(
        self,
        cfg: ProxyProtocolConfig,
        loop: asyncio.AbstractEventLoop,
        metrics: Callable[[], Any] | None = None,
        max_length: int = MAX_V2_LENGTH,
    ) -> None:
        self.networks = parse_trusted(cfg.trusted)
        self.timeout = float(cfg.timeout)
        self.passive = bool(cfg.passive)
        self.loop = loop
        self.max_length = max_length
        self._metrics = metrics or (lambda: None)
        self.headers_ok = 0
        self.headers_rejected = 0
        self.headers_local = 0  # LOCAL / UNKNOWN / UNSPEC: health checks, real endpoints used
        self.untrusted = 0  # connections from peers that may not send a header
        self.rejected_by: dict[str, int] = {"malformed": 0, "timeout": 0, "closed": 0}

    def trusted(self, ip: str) -> bool:
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
            a = a.ipv4_mapped
        return any(a in n for n in self.networks)

    def _count(self, ok: bool, reason: str = "") -> None:
        if ok:
            self.headers_ok += 1
        else:
            self.headers_rejected += 1
            self.rejected_by[reason] = self.rejected_by.get(reason, 0) + 1
        writer = self._metrics()
        if writer is not None:
            try:
                writer.inc("ftpcluster_proxy_headers_total", ("ok" if ok else "rejected",))
            except Exception:  # metrics must never cost a connection
                pass

    async def accept(self, sock: socket.socket, peer: tuple[str, int], where: str) -> tuple[tuple[str, int], dict[str, Any]] | None:
        """(client address to believe, info) or None = drop. `peer` is the TCP peer."""
        peer = (plain_ip(peer[0]), peer[1])
        if not self.trusted(peer[0]):
            self.untrusted += 1
            return peer, {}
        try:
            header = await receive_header(self.loop, sock, self.timeout, self.max_length)
        except (ProxyError, TimeoutError, OSError) as e:
            reason = _reason(e)
            self._count(False, reason)
            log.info("PROXY header rejected", peer=peer[0], listener=where, reason=reason, error=str(e) or type(e).__name__)
            return None
        self._count(True)
        info = header.info()
        info["proxy_peer"] = peer[0]
        if enabled("proxy"):
            log.debug("PROXY header", peer=peer[0], listener=where, source=header.source, **header.info())
        if header.source is None:
            self.headers_local += 1
            info["health_check"] = True  # LOCAL: the balancer's own check, not a client
            return peer, info
        return (plain_ip(header.source[0]), header.source[1]), info

    async def control_hook(self, sock: socket.socket, client: tuple[str, int]) -> tuple[tuple[str, int], dict[str, Any]] | None:
        return await self.accept(sock, client, "control")

    async def data_peer(self, sock: socket.socket, addr: tuple[Any, ...]) -> str | None:
        """For a passive listener: the address that opened this data connection, or None."""
        got = await self.accept(sock, (addr[0], addr[1]), "passive")
        return None if got is None else got[0][0]

    def stats(self) -> dict[str, Any]:
        return {
            "headers_ok": self.headers_ok,
            "headers_rejected": self.headers_rejected,
            "headers_local": self.headers_local,
            "untrusted": self.untrusted,
            "rejected_by": dict(self.rejected_by),
        }


def open_proxy(cfg: ProxyProtocolConfig, loop: asyncio.AbstractEventLoop, metrics: Any = None) -> ProxyReceiver | None:
    """The node's PROXY receiver when `[proxy_protocol] enabled`, else None."""
    if not cfg.enabled:
        return None
    return ProxyReceiver(cfg, loop, metrics=lambda: metrics)
