"""Command lines to (verb, argument), and the small argument grammars several
handlers share. Pure functions: no session, no filesystem."""

from __future__ import annotations

# Lines that show a client speaking another protocol on the FTP port (ProFTPD's BadProtocol).
FOREIGN_PROTOCOL = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "EHLO", "HELO", "SSH"})
# An SSH client's identification line (RFC 4253 §4.2); "-" ends a verb, so it is matched by prefix.
FOREIGN_PREFIXES = (b"SSH-",)

# Verbs of RFC 959 and RFC 2228 that this server knows but does not implement: 502, not
# "500 unrecognized". SMNT: one file system per user; ADAT MIC CONF ENC: unused by TLS (RFC 4217).
NOT_IMPLEMENTED = frozenset({"SMNT", "ADAT", "MIC", "CONF", "ENC"})


def parse_line(line: bytes) -> tuple[str | None, str]:
    """Split 'VERB arg' into (VERB upper-case, arg). None for a line with no verb.

    Telnet IAC sequences (IP, DM, sent before ABOR) and other non-letters before the
    verb are skipped. Arguments are UTF-8 (RFC 2640); undecodable bytes are kept as
    surrogates so a name round-trips to the filesystem."""
    i = 0
    n = len(line)
    while i < n and not (65 <= line[i] <= 90 or 97 <= line[i] <= 122):
        if line[i] < 0x80 and line[i] not in (0x20, 0x09):
            break  # a printable non-letter first: not a verb
        i += 1
    j = i
    while j < n and j - i < 16 and (65 <= line[j] <= 90 or 97 <= line[j] <= 122 or 48 <= line[j] <= 57):
        j += 1
    if j == i or (j < n and line[j] != 0x20):
        return None, ""
    verb = line[i:j].decode("ascii").upper()
    arg = line[j + 1 :].decode("utf-8", "surrogateescape") if j < n else ""
    return verb, arg


def verb_of(line: bytes) -> str:
    verb, _ = parse_line(line)
    return verb or ""


def split_list_arg(arg: str) -> str:
    """Drop ls-style options ('-la', '-l dir') that many clients send with LIST."""
    words = arg.split(" ")
    while words and words[0].startswith("-"):
        words.pop(0)
    return " ".join(words)
