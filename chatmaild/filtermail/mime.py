"""Message-level checks of the OpenPGP-only filter: pure functions, no I/O.

Every public function takes the raw message (``bytes``, CRLF as received over
SMTP, dot-stuffing already removed) or a :class:`ParsedMessage` made from it,
never raises on hostile input, and answers False/None when in doubt.

Parsing is done once and lazily: :class:`ParsedMessage` parses only the header
section, with :mod:`.headers` (the one header parser of all checks; the
fields are held in a compat32 ``email`` Message for its parameter parsing),
and splits a multipart body by searching for its boundary with
``bytes.find``, so a 25 MB encrypted message is never split into Python lines
and its payload is sliced, not copied around.  A part's own (small) header
section goes through the same parser.

Stricter than the reference relay on purpose:

- a malformed header section (``From :``, a line that is no field) is
  refused, see :mod:`.headers`;

- the From header must occur exactly once and hold exactly one mailbox (a
  second From or a list of authors is how a sender is spoofed in clients that
  show another one than we checked);
- a Secure-Join body must name the same step as its header;
- a mailer-daemon report must be ``multipart/report; report-type=delivery-status``;
- a part with an unknown Content-Transfer-Encoding is not decoded (= not accepted).
"""

from __future__ import annotations

import binascii
import re
from email.message import Message

from chatmaild.common.addr import address_literal, header_addresses, valid_addr_spec
from chatmaild.filtermail.headers import Field, HeaderError, find_section, parse_fields
from chatmaild.filtermail.pgp import armor_problem

__all__ = [
    "ParsedMessage",
    "Part",
    "address_domain",
    "encryption_problem",
    "extract_address",
    "from_address",
    "is_domain_literal",
    "is_encrypted",
    "is_mailer_daemon_report",
    "is_null_path",
    "is_securejoin",
    "is_self_sent_autocrypt_setup",
]

SECUREJOIN_STEPS = ("vc-request", "vg-request")
ASM_SUBJECT = "Autocrypt Setup Message"

IDENTITY_ENCODINGS = ("7bit", "8bit", "binary", "")


class Part:
    """One MIME entity: its parsed header block and where its raw body lies in the message."""

    __slots__ = ("headers", "data", "start", "stop")

    def __init__(self, headers: Message, data: bytes | bytearray, start: int, stop: int):
        self.headers = headers
        self.data = data  # the whole message; the body is data[start:stop]
        self.start = start
        self.stop = stop

    @property
    def body(self) -> memoryview:
        """The raw (still transfer-encoded) body, without copying it."""
        return memoryview(self.data)[self.start : self.stop]

    @property
    def content_type(self) -> str:
        """``maintype/subtype``, lower-cased (``text/plain`` when absent or invalid)."""
        return self.headers.get_content_type()

    @property
    def transfer_encoding(self) -> str:
        return str(self.headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()

    def decoded_body(self) -> bytes | None:
        """The body with its Content-Transfer-Encoding removed, None if that fails."""
        cte = self.transfer_encoding
        if cte in IDENTITY_ENCODINGS:
            return self.data[self.start : self.stop]
        if cte == "base64":
            try:
                return binascii.a2b_base64(self.body)
            except (binascii.Error, ValueError):
                return None
        if cte == "quoted-printable":
            return binascii.a2b_qp(self.body)
        return None


def _message(fields: list[Field]) -> Message:
    """The fields as a compat32 Message (raw values, as email's own parser stores them)."""
    msg = Message()
    for f in fields:
        value = f.value.decode("ascii", "surrogateescape").lstrip(" \t")
        msg.set_raw(f.name.decode("ascii"), value.rstrip("\r\n"))
    return msg


class ParsedMessage:
    """A message parsed once for all checks: headers now, body parts on demand.

    Raises :class:`~.headers.HeaderError` for a header section the filters
    refuse (see :mod:`.headers`); the public functions below answer False/None.
    """

    def __init__(self, data: bytes | bytearray):
        # a bytearray is used as it is (no copy); do not resize it while checks run
        self.data = data
        section = find_section(data)
        self.eol = section.eol
        self.header_end = section.header_end
        self.fields = parse_fields(memoryview(data)[: section.header_end], section.eol)
        self.headers: Message = _message(self.fields)
        self.body_start = section.body_start
        self._parts: dict[int, list[Part] | None] = {}

    @property
    def body(self) -> memoryview:
        return memoryview(self.data)[self.body_start :]

    @property
    def content_type(self) -> str:
        return self.headers.get_content_type()

    def get(self, name: str) -> str | None:
        """First value of header ``name`` (raw, unfolded newlines kept), or None."""
        value = self.headers.get(name)
        return None if value is None else str(value)

    def get_all(self, name: str) -> list[str]:
        return [str(v) for v in self.headers.get_all(name, [])]

    def parts(self, limit: int) -> list[Part] | None:
        """Top-level parts of a multipart message, or None.

        None when the message is not multipart, has no usable boundary, lacks the
        closing delimiter, or has more than ``limit`` parts (we stop searching
        then, so a huge message with many parts costs no more than needed).
        """
        if limit not in self._parts:
            self._parts[limit] = self._split_parts(limit)
        return self._parts[limit]

    def _split_parts(self, limit: int) -> list[Part] | None:
        if self.headers.get_content_maintype() != "multipart":
            return None
        boundary = self.headers.get_boundary()
        if not boundary or len(boundary) > 200:  # RFC 2046: 1..70 characters
            return None
        try:
            delim = b"--" + boundary.encode("ascii")
        except UnicodeEncodeError:
            return None
        data, eol = self.data, self.eol
        sep = eol + delim
        cur = None  # start of the next part, -1 after the close delimiter
        if data.startswith(delim, self.body_start):
            cur = _after_delimiter(data, self.body_start + len(delim), eol)
        search = self.body_start
        while cur is None:  # skip the preamble
            nxt = data.find(sep, search)
            if nxt < 0:
                return None
            cur = _after_delimiter(data, nxt + len(sep), eol)
            search = nxt + 1
        parts: list[Part] = []
        mv = memoryview(data)
        while cur != -1:
            start = cur
            search = start - len(eol)  # an empty part ends right away
            while True:
                nxt = data.find(sep, search)
                if nxt < 0:
                    return None  # no closing delimiter: truncated
                cur = _after_delimiter(data, nxt + len(sep), eol)
                if cur is not None:
                    break
                search = nxt + 1
            if len(parts) >= limit:
                return None
            stop = max(nxt, start)
            try:  # a part's header section follows the same rules as the message's
                section = find_section(data, start, stop)
                fields = parse_fields(mv[start : section.header_end], section.eol)
            except HeaderError:
                return None
            body_start = min(section.body_start, stop)
            parts.append(Part(_message(fields), data, body_start, stop))
        return parts  # the epilogue after the close delimiter is ignored


def _after_delimiter(data: bytes | bytearray, tail: int, eol: bytes) -> int | None:
    """After ``--boundary`` at ``tail``: -1 for a close delimiter, the start of
    the next part for a delimiter line, None if this is no delimiter line."""
    if data.startswith(b"--", tail):
        return -1
    line_end = data.find(eol, tail)
    if line_end < 0 or data[tail:line_end].strip(b" \t"):
        return None
    return line_end + len(eol)


def _parsed(msg: bytes | bytearray | ParsedMessage) -> ParsedMessage:
    if isinstance(msg, ParsedMessage):
        return msg
    if not isinstance(msg, bytes | bytearray):
        msg = bytes(msg)
    return ParsedMessage(msg)


# --- encryption ---------------------------------------------------------------


def encryption_problem(msg: bytes | bytearray | ParsedMessage, outgoing: bool) -> str | None:
    """Why the message is not an RFC 3156 encrypted message, or None if it is one."""
    try:
        return _encryption_problem(_parsed(msg), outgoing)
    except Exception as exc:  # hostile input must never crash the filter
        return f"parse failed: {type(exc).__name__}"


def _encryption_problem(msg: ParsedMessage, outgoing: bool) -> str | None:
    if msg.content_type != "multipart/encrypted":
        return f"content type is {msg.content_type}"
    parts = msg.parts(limit=2)
    if parts is None:
        return "not exactly two well-delimited parts"
    if len(parts) != 2:
        return f"{len(parts)} parts instead of two"
    control, payload = parts
    if control.content_type != "application/pgp-encrypted":
        return f"first part is {control.content_type}"
    body = control.decoded_body()
    if body is None or body.strip() != b"Version: 1":
        return "first part is not 'Version: 1'"
    if payload.content_type != "application/octet-stream":
        return f"second part is {payload.content_type}"
    if payload.transfer_encoding in IDENTITY_ENCODINGS:
        # check the armor in place: a 25 MB payload is not copied before decoding
        problem = armor_problem(payload.data, outgoing, start=payload.start, end=payload.stop)
    else:
        text = payload.decoded_body()
        if text is None:
            return "second part has an unknown transfer encoding"
        problem = armor_problem(text, outgoing)
    return None if problem is None else f"payload: {problem}"


def is_encrypted(msg: bytes | bytearray | ParsedMessage, outgoing: bool) -> bool:
    """True for a PGP/MIME (RFC 3156) message whose payload passes the armor and packet checks.

    ``outgoing`` forbids armor headers (``Version:``, ``Comment:``) in the payload.
    """
    return encryption_problem(msg, outgoing) is None


# --- exceptions to the encryption rule ------------------------------------------


def is_securejoin(msg: bytes | bytearray | ParsedMessage) -> bool:
    """True for a legacy Secure-Join ``vc-request``/``vg-request`` in its exact shape.

    One ``Secure-Join`` header whose value is exactly the step, a multipart
    message with exactly one ``text/plain`` part whose trimmed body is
    ``Secure-Join: <step>`` (case-insensitive).  Every other step is encrypted.
    """
    try:
        m = _parsed(msg)
        values = m.get_all("Secure-Join")
        if len(values) != 1 or values[0].strip() not in SECUREJOIN_STEPS:
            return False
        step = values[0].strip()
        parts = m.parts(limit=1)
        if not parts or len(parts) != 1 or parts[0].content_type != "text/plain":
            return False
        if len(parts[0].body) > 65536:
            return False
        body = parts[0].decoded_body()
        if body is None:
            return False
        return body.strip().lower() == b"secure-join: " + step.encode()
    except Exception:
        return False


def is_self_sent_autocrypt_setup(
    msg: bytes | bytearray | ParsedMessage, mail_from: str, rcpts: list[str]
) -> bool:
    """True for an Autocrypt Setup Message a user sends to themselves only.

    Exactly one recipient, equal to the envelope sender and to the From address,
    Subject exactly ``Autocrypt Setup Message``, top level ``multipart/mixed``.
    """
    try:
        m = _parsed(msg)
        if len(rcpts) != 1 or not mail_from:
            return False
        sender = mail_from.lower()
        if rcpts[0].lower() != sender or from_address(m) != sender:
            return False
        subjects = m.get_all("Subject")
        if len(subjects) != 1 or subjects[0].strip() != ASM_SUBJECT:
            return False
        return m.content_type == "multipart/mixed"
    except Exception:
        return False


def is_mailer_daemon_report(msg: bytes | bytearray | ParsedMessage) -> bool:
    """True for a delivery status report from a mailer daemon (incoming only).

    A non-empty ``Auto-Submitted`` header, a From address whose local part is
    ``mailer-daemon``, and ``multipart/report; report-type=delivery-status``.
    """
    try:
        m = _parsed(msg)
        auto = m.get("Auto-Submitted")
        if auto is None or not auto.strip():
            return False
        sender = from_address(m)
        if sender is None or not sender.startswith("mailer-daemon@"):
            return False
        if m.content_type != "multipart/report":
            return False
        report_type = m.headers.get_param("report-type")
        return isinstance(report_type, str) and report_type.lower() == "delivery-status"
    except Exception:
        return False


# --- addresses ------------------------------------------------------------------------

_PREFIX_RE = re.compile(r"\s*(?:mail\s+from|rcpt\s+to)\s*:\s*", re.IGNORECASE)


def is_domain_literal(domain: str) -> bool:
    """True for ``[1.2.3.4]`` / ``[IPv6:...]`` (any case), RFC 5321 address literals."""
    return address_literal(domain) is not None


def _angle_content(text: str) -> str | None:
    """The text inside the first ``<...>``, honouring quoted strings; None if unbalanced."""
    start = None
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            if c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<" and start is None:
            start = i + 1
        elif c == ">" and start is not None:
            return text[start:i]
    return None


def _first_token(text: str) -> str:
    """Up to the first whitespace outside a quoted string."""
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c in " \t\r\n" and not quoted:
            return text[:i]
    return text


def is_null_path(text: str) -> bool:
    """True for the null reverse-path: ``<>`` or ``MAIL FROM:<>`` (ESMTP params ignored)."""
    if not isinstance(text, str):
        return False
    m = _PREFIX_RE.match(text)
    text = text[m.end() :] if m else text.strip()
    return text.startswith("<>") and (len(text) == 2 or text[2] in " \t")


def extract_address(text: str) -> str | None:
    """The lower-cased address in an SMTP path argument or a simple header value.

    Accepts ``MAIL FROM:<a@b> SIZE=1`` / ``RCPT TO:<a@b> NOTIFY=NEVER`` (the
    command prefix is optional, ESMTP parameters after the path are ignored),
    ``<a@b>``, ``Name <a@b>``, bare ``a@b``, source routes ``<@relay:a@b>``,
    quoted local parts, SRS local parts, and domain literals ``[192.0.2.1]`` /
    ``[IPv6:2001:db8::1]`` with or without angle brackets.  Returns None for
    anything else, including the null path ``<>`` (see :func:`is_null_path`).
    """
    try:
        if not isinstance(text, str) or len(text) > 2048:
            return None
        m = _PREFIX_RE.match(text)
        text = text[m.end() :] if m else text.strip()
        if "<" in text:
            inner = _angle_content(text)
            if inner is None:
                return None
        else:
            inner = _first_token(text)
        inner = inner.strip()
        if inner.startswith("@"):  # RFC 5321 source route: ignore it
            colon = inner.find(":")
            if colon < 0:
                return None
            inner = inner[colon + 1 :]
        return valid_addr_spec(inner)
    except Exception:
        return None


def address_domain(addr: str) -> str | None:
    """The lower-cased domain of an address (a domain literal keeps its brackets)."""
    if not isinstance(addr, str) or "@" not in addr:
        return None
    domain = addr.rpartition("@")[2].lower()
    return domain or None


def from_address(msg: bytes | bytearray | ParsedMessage) -> str | None:
    """The lower-cased address of the one and only From mailbox, or None.

    None if there is no From header, more than one, or more than one mailbox
    in it (group syntax: its single member counts), or the address is invalid.
    """
    try:
        values = _parsed(msg).get_all("From")
        if len(values) != 1:
            return None
        value = values[0]
        if len(value) > 4096:
            return None
        mailboxes = header_addresses(value)
        if mailboxes is None or len(mailboxes) != 1:
            return None
        return valid_addr_spec(mailboxes[0])
    except Exception:
        return None
