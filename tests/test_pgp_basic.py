"""Hand-built packet sequences and armor edge cases for chatmaild.filtermail.pgp."""

from __future__ import annotations

import base64
import os

import pytest

from chatmaild.filtermail import pgp
from testing import mails


def crc24_reference(data: bytes) -> int:
    """Bit-by-bit CRC24 straight from the RFC 4880 definition."""
    crc = 0xB704CE
    for b in data:
        crc ^= b << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def new_packet(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 192:
        length = bytes([n])
    elif n < 8384:
        n -= 192
        length = bytes([(n >> 8) + 192, n & 0xFF])
    else:
        length = b"\xff" + n.to_bytes(4, "big")
    return bytes([0xC0 | tag]) + length + body


def legacy_packet(tag: int, body: bytes, ltype: int = 2) -> bytes:
    return bytes([0x80 | tag << 2 | ltype]) + len(body).to_bytes(1 << ltype, "big") + body


def partial_packet(tag: int, body: bytes, chunk_power: int = 9) -> bytes:
    out = bytes([0xC0 | tag])
    chunk = 1 << chunk_power
    while len(body) > chunk:
        out += bytes([224 + chunk_power]) + body[:chunk]
        body = body[chunk:]
    return out + new_packet(tag, body)[1:]


PKESK = new_packet(1, b"\x03" + os.urandom(100))
SKESK = new_packet(3, b"\x04" + os.urandom(20))
SEIPD = new_packet(18, b"\x01" + os.urandom(300))


def armor(binary: bytes, headers: tuple[str, ...] = (), crc: bool = True) -> bytes:
    return mails.armor(binary, tuple(h.encode() for h in headers), crc)


@pytest.mark.parametrize("n", [0, 1, 3, 100, 4097])
def test_the_armor_helper_writes_the_rfc_crc24(n):
    data = os.urandom(n)
    assert mails.crc24(data) == crc24_reference(data)
    assert mails.crc24(b"") == 0xB704CE  # the init value


def crc_line_of(text: bytes) -> bytes:
    return text[text.rindex(b"\r\n=") + 2 : text.index(pgp.END) - 2]


@pytest.mark.parametrize(
    "other",
    [
        b"=AAAA",  # wrong
        b"=////",
        b"=njUN",
        b"=AAA",  # malformed: too short
        b"=AAAAA",  # too long
        b"=3D7rkM",  # quoted-printable encoded "="
        b"=",
        b"==",
        b"=AA==",
        b"=njUN ",  # trailing blanks
        b"=njUN\t",
    ],
)
def test_a_wrong_or_malformed_crc_is_not_a_reason_to_refuse(other):
    # RFC 9580 6.1: readers MUST NOT reject armor whose CRC is present, missing,
    # malformed or wrong
    text = armor(VALID)
    assert pgp.armor_problem(text.replace(crc_line_of(text), other), True) is None


@pytest.mark.parametrize(
    "other",
    [
        b"=njUN is the CRC",  # words are not a checksum
        b"=AAAAAAAAA",  # longer than any checksum: base64 content in disguise
        b"=nj-UN",
        b"= njUN",
        b"njUN",  # not a checksum, and no base64 line of this length fits
        b"=njUN\x00",
    ],
)
def test_a_line_that_is_no_checksum_is_refused(other):
    text = armor(VALID)
    assert pgp.armor_problem(text.replace(crc_line_of(text), other), True) is not None


def test_padding_on_its_own_line_is_data_not_a_checksum():
    # a writer wrapping at a width that is no multiple of 4 can leave "==" alone
    for extra in (1, 2):  # base64 of these ends in "=" and "=="
        data = PKESK + new_packet(18, b"\x01" + os.urandom(301 - extra))
        b64 = base64.b64encode(data)
        pad = len(b64) - len(b64.rstrip(b"="))
        assert pad == extra
        lines = [b64[:-pad], b64[-pad:]]
        for crc in ([], [b"=njUN"], [b"=="]):
            text = b"\r\n".join([pgp.BEGIN, b"", *lines, *crc, pgp.END])
            assert pgp.armor_problem(text, True) is None, (extra, crc)


@pytest.mark.parametrize(
    "packets",
    [
        [PKESK, SEIPD],
        [PKESK, PKESK, SKESK, SEIPD],
        [SEIPD],
        # GnuPG: legacy headers (tags 0..15 only, so SEIPD is always new format)
        [legacy_packet(1, b"\x03" + os.urandom(50), 0), legacy_packet(3, b"\x04" * 300, 1), SEIPD],
        [PKESK, partial_packet(18, b"\x01" + os.urandom(5000))],
        [
            PKESK,
            partial_packet(18, b"\x01" + os.urandom(1024), 9),
        ],
        [new_packet(1, b"\x06" + os.urandom(60)), new_packet(18, b"\x02" + os.urandom(90))],
    ],
)
def test_valid_packet_sequences(packets):
    data = b"".join(packets)
    assert pgp.packet_problem(data) is None
    assert pgp.check_openpgp_packets(data)
    assert pgp.check_armored_payload(armor(data), outgoing=True)


@pytest.mark.parametrize(
    ("packets", "why"),
    [
        ([], "empty"),
        ([PKESK], "last packet is type 1"),
        ([SEIPD, PKESK], "type 18 before the end"),
        ([SEIPD, SEIPD], "type 18 before the end"),
        ([PKESK, new_packet(11, b"b" + b"x" * 20)], "type 11 not allowed"),
        ([new_packet(8, b"\x01" + b"x" * 20)], "type 8 not allowed"),
        ([new_packet(2, b"\x04" + b"x" * 20)], "type 2 not allowed"),
        ([PKESK, new_packet(20, b"\x01" + b"x" * 20)], "type 20 not allowed"),
        ([PKESK, new_packet(18, b"\x07" + b"x" * 20)], "version 7"),
        ([new_packet(1, b"\x09" + b"x" * 20), SEIPD], "version 9"),
        ([PKESK, new_packet(18, b"")], "empty body"),
        ([bytes([0x80 | 1 << 2 | 3]) + b"\x03" + b"x" * 20, SEIPD], "indeterminate"),
        ([legacy_packet(1, b"\x03" + b"x" * 20, 1)[:2]], "truncated length"),
        ([legacy_packet(8, b"\x01" + b"x" * 20, 1), SEIPD], "type 8 not allowed"),
        ([partial_packet(1, b"\x03" + b"x" * 1000), SEIPD], "partial length on packet type 1"),
        ([PKESK, SEIPD, b"\x00"], "before the end"),
        ([PKESK, SEIPD, SEIPD[:3]], "before the end"),
        ([b"\x01\x02\x03"], "not a packet header"),
        ([PKESK, SEIPD[:-1]], "truncated"),
        ([PKESK, b"\xd2"], "truncated length"),
        ([PKESK, b"\xd2\xff\x00"], "truncated length"),
        ([PKESK, b"\xd2\xe9" + b"\x01" * 100], "truncated packet"),
        ([PKESK, b"\xd2\xe9" + b"\x01" * 512], "truncated length"),
    ],
)
def test_invalid_packet_sequences(packets, why):
    data = b"".join(packets)
    problem = pgp.packet_problem(data)
    assert problem is not None and why in problem
    assert not pgp.check_armored_payload(armor(data), outgoing=False)


def test_aead_packet_only_when_allowed():
    data = PKESK + new_packet(20, b"\x01" + os.urandom(50))
    assert not pgp.check_openpgp_packets(data)
    assert pgp.check_openpgp_packets(data, allow_aead=True)
    assert not pgp.check_openpgp_packets(new_packet(20, b"\x01x") + SEIPD, allow_aead=True)


VALID = PKESK + SEIPD


def test_armor_variants():
    base = armor(VALID)
    assert pgp.armor_problem(base, True) is None
    assert pgp.check_armored_payload(base.decode(), True)  # str input
    for n in range(4):
        assert pgp.check_armored_payload(base + b"\r\n" * n, True)
    assert pgp.check_armored_payload(base[:-2], True)  # no final CRLF
    # CRC-less armor, with and without base64 padding
    for extra in (b"", b"x", b"xy"):
        data = PKESK + new_packet(18, b"\x01" + os.urandom(300) + extra)
        assert pgp.armor_problem(armor(data, crc=False), True) is None


def test_armor_headers_incoming_only():
    for headers in [
        ("Version: ProtonMail",),
        ("Version: GopenPGP 2.7.4", "Comment: https://gopenpgp.org"),
        ("Comment: Ünïcode comment",),
    ]:
        text = armor(VALID, headers)
        assert pgp.armor_problem(text, outgoing=False) is None
        assert "armor header" in pgp.armor_problem(text, outgoing=True)


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda t: t.replace(b"\r\n", b"\n"), "BEGIN"),
        (lambda t: t[:40] + t[40:].replace(b"\r\n", b"\n", 1), "invalid base64"),
        (lambda t: b" " + t, "BEGIN"),
        (lambda t: t + b"x", "END"),
        (lambda t: t + b"\n", "END"),
        (lambda t: t.replace(b"\r\n\r\n", b"\r\n\r\n\r\n", 1), "blank line"),
        (lambda t: t.replace(b"\r\n=", b"\r\n\r\n=", 1), "blank line"),
        (lambda t: t.replace(b"\r\n=", b"=\r\n=", 1), "invalid base64"),
        (lambda t: t.replace(b"\r\n=", b"*\r\n=", 1), "invalid base64"),
        (lambda t: t[:60] + b" " + t[60:], "invalid base64"),
        (lambda t: pgp.BEGIN + b"\r\n\r\n=njUN\r\n" + pgp.END, "no payload"),
        (lambda t: pgp.BEGIN + b"\r\n" + pgp.END, "no payload"),
        (lambda t: pgp.BEGIN + b"\r\n", "END"),
        (lambda t: pgp.END + b"\r\n", "BEGIN"),
        (lambda t: b"HELLOWORLD", "BEGIN"),
        (lambda t: t.replace(b"\r\n\r\n", b"\r\nVersion: 1\r\n", 1), "missing blank line"),
        (lambda t: t.replace(b"\r\n\r\n", b"\r\nVersion:1\r\n\r\n", 1), "malformed armor header"),
    ],
)
def test_armor_rejects(mutate, why):
    text = mutate(armor(VALID))
    problem = pgp.armor_problem(text, outgoing=False)
    assert problem is not None and why in problem, problem


def test_armor_of_non_pgp_base64():
    text = armor(b"Hello, this is not OpenPGP at all")
    assert not pgp.check_armored_payload(text, False)


def test_no_blank_line_is_tolerated_like_the_reference():
    text = armor(VALID).replace(b"\r\n\r\n", b"\r\n", 1)
    assert pgp.check_armored_payload(text, True)
