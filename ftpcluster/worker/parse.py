"""Command lines to (verb, argument), and the small argument grammars several
handlers share. Pure functions: no session, no filesystem."""

from __future__ import annotations

import re

# Lines that show a client speaking another protocol on the FTP port (ProFTPD's BadProtocol).
FOREIGN_PROTOCOL = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "EHLO", "HELO", "SSH"})
# An SSH client's identification line (RFC 4253 §4.2); "-" ends a verb, so it is matched by prefix.
FOREIGN_PREFIXES = (b"SSH-",)

# Verbs of RFC 959 and RFC 2228 that this server knows but does not implement: 502, not
# "500 unrecognized". SMNT: one file system per user; ADAT MIC CONF ENC: unused by TLS (RFC 4217).
NOT_IMPLEMENTED = frozenset({"SMNT", "ADAT", "MIC", "CONF", "ENC"})


# Telnet IAC sequences (IP, DM, sent before ABOR: bytes >= 0x80) and blanks may come
# before the verb; the verb is 1 to 16 letters or digits, then a space
# (the argument is everything after it) or the end of the line.
_LINE = re.compile(rb"[\x80-\xff \t]*([A-Za-z0-9]{1,16})(?: (.*))?\Z", re.DOTALL)


def parse_line(line: bytes) -> tuple[str | None, str]:
    """Split 'VERB arg' into (VERB upper-case, arg). None for a line with no verb.

    Arguments are UTF-8 (RFC 2640); undecodable bytes are kept as surrogates so a
    name round-trips to the filesystem."""
    m = _LINE.match(line)
    if m is None:
        return None, ""
    verb, arg = m.groups()
    return verb.decode("ascii").upper(), arg.decode("utf-8", "surrogateescape") if arg is not None else ""


def verb_of(line: bytes) -> str:
    verb, _ = parse_line(line)
    return verb or ""


def split_list_arg(arg: str) -> str:
    """Drop ls-style options ('-la', '-l dir') that many clients send with LIST;
    '--' ends them, as in ls ('LIST -- -la' lists the file '-la')."""
    words = arg.split(" ")
    while words and words[0].startswith("-"):
        if words.pop(0) == "--":
            break
    return " ".join(words)
