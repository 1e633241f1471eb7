"""Parse IMAP FETCH responses as imaplib returns them (for tests): the
parenthesized lists of RFC 9051 with NIL, atoms, quoted strings and literals."""

from __future__ import annotations

import re

Item = bytes | None | list["Item"]

_TOKEN = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|\{(\d+)\}(?:\r\n)?|([^\s()"]+))')


def parse_list(data: bytes) -> list[Item]:
    """Every top-level item of ``data`` (literals ``{n}`` inline)."""
    stack: list[list[Item]] = [[]]
    pos = 0
    while pos < len(data):
        m = _TOKEN.match(data, pos)
        if m is None:
            if data[pos:].strip():
                raise ValueError(f"cannot parse IMAP data at {data[pos : pos + 20]!r}")
            break
        pos = m.end()
        opened, closed, quoted, literal, atom = m.groups()
        if opened:
            stack.append([])
        elif closed:
            done = stack.pop()
            stack[-1].append(done)
        elif quoted is not None:
            stack[-1].append(re.sub(rb"\\(.)", rb"\1", quoted))
        elif literal is not None:
            n = int(literal)
            stack[-1].append(data[pos : pos + n])
            pos += n
        else:
            stack[-1].append(None if atom.upper() == b"NIL" else atom)
    if len(stack) != 1:
        raise ValueError("unbalanced parentheses in IMAP data")
    return stack[0]


def fetch_items(response: list) -> list[Item]:
    """imaplib's ``fetch()`` data (bytes and (header, literal) tuples) as one list."""
    raw = b""
    for part in response:
        if isinstance(part, tuple):
            raw += part[0] + part[1]
        elif part is not None:
            raw += part
    return parse_list(raw)


def envelope_addresses(envelope: list[Item], field: str = "from") -> list[str]:
    """``mailbox@host`` of each address in an ENVELOPE field (from, sender, to, ...)."""
    index = ["date", "subject", "from", "sender", "reply-to", "to", "cc", "bcc"].index(field)
    addresses = envelope[index] or []
    out = []
    for addr in addresses:  # (name adl mailbox host); a group is mailbox-only pairs
        mailbox, host = addr[2], addr[3]
        if mailbox is not None and host is not None:
            out.append(f"{mailbox.decode()}@{host.decode()}")
    return out
