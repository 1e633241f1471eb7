"""The one parser of header sections that every filter check relies on.

Pure functions, no I/O.  The From check, the encryption and Secure-Join
checks, the outgoing header cleanup and the DKIM header selection all see
the header fields this module finds, so none of them can disagree with
another about which fields a message has.

Postfix and Dovecot read more than RFC 5322's strict syntax: a field name
followed by whitespace before the colon (``From :``, the obsolete syntax of
RFC 5322 4.5) is that field to them; Postfix even rewrites it into a
``From:`` header.  A parser that skips such a line lets a sender add a second
author that every check here misses and every mail client shows.  Rather
than guess how each downstream program reads the rarer forms, a header
section must consist of well-formed fields only: ``name:`` with a name of
printable ASCII (RFC 5322 ``ftext``) directly followed by the colon, and
continuation lines starting with whitespace.  Anything else is refused with
a precise ``554 5.6.0`` (no chat client or mail server writes such lines),
so the top-level header fields seen here are the ones everyone sees.

The section ends at the first empty line, or at the end of an entity that
has no body.  It must end within :data:`MAX_HEADER_SECTION` bytes: a message
without an empty line is otherwise all header, and parsing 30 MB of header
fields costs twenty times the CPU of checking a 30 MB encrypted message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Far above any real header section (Delta Chat: ~3 kB; a mailing list mail
# with a long Received chain and ARC sets: ~30 kB; a To of 5000 addresses:
# 200 kB), far below what costs time: parsing a full one (43000 fields) takes
# ~0.1 s here and again in dkimpy, as much as checking a 3 MB encrypted message.
MAX_HEADER_SECTION = 256 * 1024

_FIELD_NAME_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # ftext: printable ASCII but ":"
_OBSOLETE_NAME_RE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]+:")


class HeaderError(ValueError):
    """A header section the filters refuse; ``reply`` is the SMTP answer."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def _malformed(what: str) -> HeaderError:
    return HeaderError(f"554 5.6.0 Malformed header section: {what}")


@dataclass(frozen=True, slots=True)
class Field:
    name: bytes  # as written
    raw: bytes  # the whole field: name, colon, value, continuation lines, line ends

    @property
    def lname(self) -> bytes:
        return self.name.lower()

    @property
    def value(self) -> bytes:
        """Everything after the colon (folding kept, final line end removed)."""
        value = self.raw[len(self.name) + 1 :]
        if value.endswith(b"\r\n"):
            return value[:-2]
        return value[:-1] if value.endswith(b"\n") else value


@dataclass(frozen=True, slots=True)
class Section:
    """Where an entity's header section and body lie in the buffer."""

    header_end: int  # just after the line end of the last header line
    body_start: int  # after the empty line (== header_end == end if there is no body)
    eol: bytes  # b"\r\n" (SMTP) or b"\n" (files with LF line ends)


def find_section(
    data: bytes | bytearray, start: int = 0, end: int | None = None,
    limit: int = MAX_HEADER_SECTION,
) -> Section:  # fmt: skip
    """Split ``data[start:end]`` at the empty line after its header section.

    Never looks at more than ``limit`` bytes (plus the empty line): a section
    that does not end within them raises :class:`HeaderError` (``552``).  An
    entity that starts with an empty line has no header fields.
    """
    end = len(data) if end is None else end
    if data.startswith(b"\r\n", start, end):
        return Section(start, start + 2, b"\r\n")
    if data.startswith(b"\n", start, end):
        return Section(start, start + 1, b"\n")
    lim = min(end, start + limit + 4)
    crlf = data.find(b"\r\n\r\n", start, lim)
    # an LF-only empty line counts only if it comes first (never searched past crlf)
    lf = data.find(b"\n\n", start, crlf + 2 if crlf >= 0 else lim)
    if lf >= 0:
        found = Section(lf + 1, lf + 2, b"\n")
    elif crlf >= 0:
        found = Section(crlf + 2, crlf + 4, b"\r\n")
    elif end - start <= limit:  # no body at all: everything is header
        first_eol = data.find(b"\n", start, end)
        eol = b"\r\n" if first_eol > start and data[first_eol - 1] == 0x0D else b"\n"
        found = Section(end, end, eol)
    else:
        found = None
    if found is None or found.header_end - start > limit:
        raise HeaderError(f"552 5.3.4 Header section larger than {limit} bytes")
    return found


def parse_fields(block: bytes | bytearray | memoryview, eol: bytes = b"\r\n") -> list[Field]:
    """The fields of a header section (without its empty line); HeaderError if
    a line is neither ``name:...`` nor a continuation line."""
    block = bytes(block)
    if not block:
        return []
    if not block.endswith(eol):
        block += eol  # a header-only message may lack the last line end
    if eol == b"\r\n":
        lines = block.split(b"\r\n")
        if block.count(b"\r") != len(lines) - 1 or block.count(b"\n") != len(lines) - 1:
            raise _malformed("bare CR or LF")
    else:
        lines = block.split(b"\n")
        if b"\r" in block:
            raise _malformed("bare CR")
    lines.pop()  # the empty rest after the final line end
    fields: list[Field] = []
    name = b""
    current: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not current:
                raise _malformed("continuation line before the first field")
            current.append(line)
            continue
        colon = line.find(b":")
        if colon > 0 and _FIELD_NAME_RE.fullmatch(line, 0, colon):
            if current:
                fields.append(Field(name, eol.join(current) + eol))
            name, current = line[:colon], [line]
            continue
        obsolete = _OBSOLETE_NAME_RE.match(line)
        if obsolete:
            shown = obsolete.group(1)[:40].decode("ascii")
            raise _malformed(f"whitespace before the colon of {shown!r}")
        raise _malformed("a line that is not a header field")
    if current:
        fields.append(Field(name, eol.join(current) + eol))
    return fields
