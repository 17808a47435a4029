"""No delayed-ACK stalls for clients that leave Nagle's algorithm on (Python's ftplib as
shipped, many GUI clients): each case runs the stock client and the same client with
TCP_NODELAY against one server, interleaved, and compares the medians of the same run.

A stall is the client's second write waiting for our ACK of its first (~40 ms on
Linux): after a resumed handshake (login), and on PROT P uploads. Cases: explicit and
implicit logins, TLS 1.2 and 1.3, full and resumed (from a ticket and from the
session cache); PROT P STOR/APPE/STOU (client writes first) and RETR/LIST (server
writes first); and the plain paths (after 150, after 350 REST, after 227 and 229).

Mid-handshake: a client that writes its TLS 1.3 ChangeCipherSpec and Finished apart
(GnuTLS: lftp), compared with the same client writing them at once, on explicit and
implicit logins and PROT P data connections."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from .support_ftps_client import Case, Target, build_cases, case_names, measure, split_cases
from .support_server import make_server

ROUNDS = 7  # per client variant and case
SLACK = 0.005  # seconds


@pytest.fixture(scope="module")
def stall_cases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, dict[str, Case]]]:
    """One server with tickets (and an implicit-TLS listener), one resuming through
    its session cache only (TLS 1.3 then issues stateful tickets)."""
    base = tmp_path_factory.mktemp("nagle")
    tickets = make_server(base / "tickets", tls={"session_tickets": "local"}, implicit=True)
    cache = make_server(base / "cache", tls={"session_tickets": "off"})
    started = []
    try:
        for srv in (tickets, cache):
            started.append(srv.start())
        t = Target(tickets.host, tickets.port, tickets.user, tickets.password,
                   implicit_port=tickets.implicit_port, cache_port=cache.port)  # fmt: skip
        cases, close = build_cases(t)
        split, close_split = split_cases(t)
        yield t, {**cases, **split}
        close()
        close_split()
    finally:
        for srv in started:
            srv.stop(signal.SIGINT)


def _not_stalled(case: Case, name: str, labels: tuple[str, str], why: str) -> None:
    """The case's two variants, measured in the same run: the first within twice the
    second (plus SLACK), else a failure saying `why`."""
    got = []
    for _ in range(2):  # a second round only when the first looked stalled: noise, not a stall
        slow, fast = measure({name: case}, ROUNDS)[name]
        got.append(f"{labels[0]} {slow * 1000:.1f} ms vs {labels[1]} {fast * 1000:.1f} ms")
        if slow <= 2 * fast + SLACK:
            return
    pytest.fail(f"{name}: {why}: {'; '.join(got)} (medians of {ROUNDS})")


@pytest.mark.parametrize("name", case_names(implicit=True, cache=True))
def test_stock_client_is_not_stalled(stall_cases: tuple[Target, dict[str, Case]], name: str) -> None:
    t, cases = stall_cases
    _not_stalled(cases[name], name, ("stock", "TCP_NODELAY"), "the stock (Nagle) client waits on our ACK")
    if "resumed" in name:
        assert t.resumed.get(name) and all(t.resumed[name]), f"{name}: not every login resumed: {t.resumed.get(name)}"


@pytest.mark.parametrize("name", ["explicit login", "implicit login", "PROT P RETR"])
def test_split_tls13_finished_is_not_stalled(stall_cases: tuple[Target, dict[str, Case]], name: str) -> None:
    """Our first bytes after the client's Finished: the CCS alone must not wait for a
    delayed ACK (the GnuTLS client's Finished waits on it, Nagle on)."""
    _, cases = stall_cases
    name = f"split CCS|Finished {name}"
    _not_stalled(cases[name], name, ("split", "one write"), "the client's Finished waits on our ACK of its CCS")
