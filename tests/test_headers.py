"""The header-section parser every filter check shares (issue 14: ``From :``)."""

from __future__ import annotations

import email.parser
import email.policy
import re

import dkim as dkimpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatmaild.filtermail import mime
from chatmaild.filtermail.common import classify, clean_outgoing_headers
from chatmaild.filtermail.headers import (
    MAX_HEADER_SECTION,
    HeaderError,
    Section,
    find_section,
    parse_fields,
)
from testing import mails

ALICE = "alice@chat.example"
BOB = "bob@chat.example"

# every header field some filter check, the cleanup or DKIM looks at
CHECKED_FIELDS = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Autocrypt",
    "Autocrypt-Setup-Message",
    "Secure-Join",
    "Auto-Submitted",
    "DKIM-Signature",
    "Received",
    "X-Mailer",
    "User-Agent",
    "X-Originating-IP",
    "Reply-To",
]


def with_extra_line(line: bytes, message: bytes | None = None) -> bytes:
    """An accepted-looking encrypted message with ``line`` among its header fields."""
    message = message or mails.encrypted_message(ALICE, [BOB])
    return message.replace(b"\r\nTo: ", b"\r\n" + line + b"\r\nTo: ", 1)


def test_fields_of_a_well_formed_section():
    block = b"From: <a@b.example>\r\nSubject: one\r\n two\r\n\tthree\r\nX-Empty:\r\n"
    fields = parse_fields(block)
    assert [f.name for f in fields] == [b"From", b"Subject", b"X-Empty"]
    assert fields[1].raw == b"Subject: one\r\n two\r\n\tthree\r\n"
    assert fields[1].value == b" one\r\n two\r\n\tthree"
    assert fields[2].value == b""
    assert b"".join(f.raw for f in fields) == block
    assert parse_fields(b"") == []
    assert parse_fields(b"A: b", b"\r\n")[0].raw == b"A: b\r\n"  # header-only, no last CRLF
    assert [f.name for f in parse_fields(b"A: b\n c\nD: e\n", b"\n")] == [b"A", b"D"]


@pytest.mark.parametrize("name", CHECKED_FIELDS)
@pytest.mark.parametrize("space", [b" ", b"\t", b"  ", b" \t "])
def test_whitespace_before_the_colon_is_refused_for_every_field(name, space):
    line = name.encode() + space + b": x"
    with pytest.raises(HeaderError) as e:
        parse_fields(b"From: <a@b.example>\r\n" + line + b"\r\n")
    assert e.value.reply == (
        f"554 5.6.0 Malformed header section: whitespace before the colon of {name!r}"
    )


@pytest.mark.parametrize(
    "block,why",
    [
        (b"From: <a@b.example>\r\nX-Bogus\r\n", "a line that is not a header field"),
        (b"From x@y.example Mon Jan 1\r\nFrom: <a@b.example>\r\n", "not a header field"),
        (b"From: <a@b.example>\r\nFrom x\r\n", "not a header field"),
        (b"From: <a@b.example>\r\n: no name\r\n", "not a header field"),
        (b"From: <a@b.example>\r\nNa\xc3\xafve: x\r\n", "not a header field"),
        (b"From: <a@b.example>\r\nTwo words: x\r\n", "not a header field"),
        (b" folded first\r\nFrom: <a@b.example>\r\n", "continuation line before the first"),
        (b"From: <a@b.example>\rTo: <c@d.example>\r\n", "bare CR or LF"),
        (b"From: <a@b.example>\nTo: <c@d.example>\r\n", "bare CR or LF"),
    ],
)
def test_lines_that_are_no_fields_are_refused(block, why):
    with pytest.raises(HeaderError, match=why) as e:
        parse_fields(block)
    assert e.value.reply.startswith("554 5.6.0 Malformed header section: ")


@pytest.mark.parametrize("name", CHECKED_FIELDS)
def test_every_check_refuses_such_a_message(name):
    message = with_extra_line(name.encode() + b" : x")
    with pytest.raises(HeaderError):
        mime.ParsedMessage(message)
    with pytest.raises(HeaderError):
        classify(message, True, ALICE, [BOB])
    # the public checks fail closed
    assert mime.from_address(message) is None
    assert not mime.is_encrypted(message, outgoing=True)
    assert not mime.is_securejoin(message)
    assert not mime.is_mailer_daemon_report(message)
    assert not mime.is_self_sent_autocrypt_setup(message, ALICE, [ALICE])


def test_a_part_with_a_malformed_header_section_is_not_encrypted():
    message = mails.encrypted_message(ALICE, [BOB])
    assert mime.is_encrypted(message, outgoing=True)
    bad = message.replace(b"\r\nContent-Type: application/octet-stream", b"\r\nContent-Type :", 1)
    assert bad != message
    assert "not exactly two well-delimited parts" in mime.encryption_problem(bad, True)


def test_cleanup_sees_the_same_fields():
    message = mails.encrypted_message(ALICE, [BOB], extra_headers=("Received: from x",))
    result = classify(message, True, ALICE, [BOB])
    cleaned = clean_outgoing_headers(result.fields, "chat.example")
    assert b"Received:" not in cleaned and b"Subject: [...]\r\n" in cleaned
    assert message[: result.header_end].startswith(b"From: <alice@chat.example>\r\n")
    assert message[result.body_start :].startswith(b"--bnd")


def test_section_boundaries():
    assert find_section(b"A: b\r\n\r\nbody\r\n") == Section(6, 8, b"\r\n")
    assert find_section(b"A: b\r\n") == Section(6, 6, b"\r\n")
    assert find_section(b"\r\nbody") == Section(0, 2, b"\r\n")
    assert find_section(b"A: b\n\nbody\n") == Section(5, 6, b"\n")
    data = b"X: y\r\n--\r\nA: b\r\n\r\nbody"
    assert find_section(data, 10, len(data)) == Section(16, 18, b"\r\n")


_LINE = st.one_of(
    st.sampled_from([b"From", b"To", b"Subject", b"X", b"Content-Type"]),
    st.binary(max_size=12),
).flatmap(
    lambda name: st.tuples(
        st.just(name),
        st.sampled_from([b":", b" :", b"\t:", b"", b": ", b":\t"]),
        st.sampled_from([b"", b" v", b"\tv", b" a:b", b" From: x", b" \xc3\xa9"]),
        st.sampled_from([b"", b"\r\n cont", b"\r\n\tcont", b"\r\n"]),
    )
)


def unfolded(value: str) -> str:
    return re.sub(r"\r\n(?=[ \t])", "", value).strip(" \t")


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINE, min_size=1, max_size=6))
def test_accepted_sections_read_the_same_in_email_and_dkimpy(lines):
    """Whatever this parser accepts, the stdlib's parser and dkimpy read as the
    very same fields: no check can see a field another one misses."""
    block = b"".join(name + sep + value + cont + b"\r\n" for name, sep, value, cont in lines)
    if b"\r\n\r\n" in block or block.startswith(b"\r\n"):
        return  # an empty line ends the section: not a header block
    try:
        fields = parse_fields(block)
    except HeaderError:
        return
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        block + b"\r\n"
    )
    assert not parsed.defects
    raw_items = list(parsed.raw_items())
    assert [k.encode("ascii") for k, _ in raw_items] == [f.name for f in fields]
    expected = [unfolded(f.value.decode("ascii", "surrogateescape")) for f in fields]
    # unfolded: Python 3.13 drops the fold of a value that starts on the next line
    # ("From:\r\n cont" reads "cont"), 3.11 keeps it ("\r\n cont")
    assert [unfolded(v) for _, v in raw_items] == expected
    headers, _ = dkimpy.rfc822_parse(block + b"\r\n")
    assert [name for name, _ in headers] == [f.name for f in fields]


# --- item 4: a message without an empty line is not parsed as 30 MB of header


def no_empty_line(size: int) -> bytes:
    return b"From: <remote@other.example>\r\n" + b"X: y\r\n" * (size // 6)


class Watched(bytes):
    """Records the highest offset any search of the header parser reached."""

    reached = 0

    def find(self, sub, start=0, end=None):  # type: ignore[override]
        Watched.reached = max(Watched.reached, len(self) if end is None else end)
        return super().find(sub, start, end)

    def startswith(self, prefix, start=0, end=None):  # type: ignore[override]
        Watched.reached = max(Watched.reached, start + len(prefix))
        return super().startswith(prefix, start, end)


def test_a_header_section_without_end_is_refused_after_the_limit():
    Watched.reached = 0
    with pytest.raises(HeaderError) as e:
        find_section(Watched(no_empty_line(29 * 2**20)))
    assert e.value.reply == f"552 5.3.4 Header section larger than {MAX_HEADER_SECTION} bytes"
    assert 0 < Watched.reached <= MAX_HEADER_SECTION + 4


def test_the_limit_is_exact():
    at_limit = b"X: " + b"y" * (MAX_HEADER_SECTION - 5) + b"\r\n"
    assert len(at_limit) == MAX_HEADER_SECTION
    assert find_section(at_limit + b"\r\nbody").header_end == MAX_HEADER_SECTION
    assert find_section(at_limit).header_end == MAX_HEADER_SECTION  # header-only message
    with pytest.raises(HeaderError):
        find_section(b"X" + at_limit + b"\r\nbody")
    with pytest.raises(HeaderError):
        find_section(b"X" + at_limit)


def test_parts_are_bounded_too(monkeypatch):
    """A part without an empty line is no part (and is not parsed as header)."""
    parsed_bytes = []
    real = mime.parse_fields
    monkeypatch.setattr(
        mime, "parse_fields", lambda b, e: parsed_bytes.append(len(b)) or real(b, e)
    )
    message = mails.encrypted_message(ALICE, [BOB])
    head, sep, rest = message.partition(b"\r\n--bnd")
    big_part = b"Content-Type: text/plain\r\n" + b"X: y\r\n" * 200_000
    boundary = rest.split(b"\r\n", 1)[0]
    bad = head + sep + boundary + b"\r\n" + big_part + b"\r\n--bnd" + boundary + b"--\r\n"
    assert not mime.is_encrypted(bad, outgoing=True)
    assert max(parsed_bytes) <= MAX_HEADER_SECTION


def test_classify_refuses_before_parsing_fields(monkeypatch):
    calls = []
    monkeypatch.setattr(mime, "parse_fields", lambda *a: calls.append(a))
    with pytest.raises(HeaderError) as e:
        classify(no_empty_line(29 * 2**20), False, "remote@other.example", [BOB])
    assert e.value.reply.startswith("552 5.3.4 ")
    assert calls == []
