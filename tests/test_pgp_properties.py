"""Property and fuzz tests: hostile input never raises, structural damage is always refused."""

from __future__ import annotations

import email
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmaild.filtermail import mime, pgp
from chatmaild.filtermail.headers import HeaderError
from tests.fixtures.maildata import load_mail
from tests.test_pgp_basic import armor

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_NAMES = [
    "encrypted",
    "encrypted-gpg-partial",
    "encrypted-gpg-multi",
    "encrypted-symmetric",
    "encrypted-sq",
    "encrypted-deltachat",
    "encrypted-deltachat-group",
    "securejoin-v3-deltachat",
    "encrypted-nocrc",
]


def payload_of(name: str) -> bytes:
    """The armored text of a corpus message's second part (as the filter sees it)."""
    msg = email.message_from_bytes(load_mail(name))
    return msg.get_payload()[1].get_payload(decode=True)


ARMORED = {name: payload_of(name) for name in VALID_NAMES}
BINARY = {name: pgp.dearmor(text, True)[0] for name, text in ARMORED.items()}


def test_corpus_payloads_are_valid():
    for name, text in ARMORED.items():
        assert pgp.armor_problem(text, outgoing=True) is None, name
        assert BINARY[name], name


@pytest.mark.parametrize("name", VALID_NAMES)
def test_every_binary_truncation_is_refused(name):
    data = BINARY[name]
    step = max(1, len(data) // 2000)  # every prefix of small payloads, a dense sample of big ones
    for cut in range(0, len(data), step):
        assert not pgp.check_openpgp_packets(data[:cut]), cut
    for cut in range(max(0, len(data) - 600), len(data)):  # the tail densely: chunk boundaries
        assert not pgp.check_openpgp_packets(data[:cut]), cut


@pytest.mark.parametrize("name", VALID_NAMES)
def test_re_armored_truncation_is_refused_even_with_a_correct_crc(name):
    data = BINARY[name]
    for cut in (1, 2, 10, len(data) // 2, len(data) - 1):
        assert not pgp.check_armored_payload(armor(data[:cut]), outgoing=False), cut


@SETTINGS
@given(name=st.sampled_from(VALID_NAMES), data=st.data())
def test_armor_truncation_is_refused(name, data):
    text = ARMORED[name].rstrip(b"\r\n")
    cut = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    assert not pgp.check_armored_payload(text[:cut], outgoing=False)


@SETTINGS
@given(name=st.sampled_from(VALID_NAMES), data=st.data())
def test_appended_garbage_is_refused(name, data):
    garbage = data.draw(st.binary(min_size=1, max_size=64))
    assert not pgp.check_openpgp_packets(BINARY[name] + garbage)


@SETTINGS
@given(name=st.sampled_from(VALID_NAMES), data=st.data())
def test_any_single_base64_change_keeps_a_verdict_of_the_packet_walk(name, data):
    # the CRC is not verified (RFC 9580), so a changed character is refused exactly
    # when the bytes it decodes to no longer walk as an encrypted message
    text = ARMORED[name]
    begin = text.index(b"\r\n\r\n") + 4
    end = text.rindex(b"\r\n=") if b"\r\n=" in text else text.rindex(b"\r\n-----END")
    pos = data.draw(st.integers(min_value=begin, max_value=end - 1))
    if text[pos] in b"\r\n=":
        return
    new = data.draw(
        st.sampled_from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
    )
    mutated = text[:pos] + bytes([new]) + text[pos + 1 :]
    binary, problem = pgp.dearmor(mutated, False)
    assert problem is None or "base64" in problem  # a last-quantum change may break padding
    if binary is not None:
        verdict = pgp.check_openpgp_packets(binary)
        assert pgp.check_armored_payload(mutated, outgoing=False) == verdict


@SETTINGS
@given(name=st.sampled_from(VALID_NAMES), data=st.data())
def test_random_mutations_never_raise(name, data):
    text = bytearray(ARMORED[name])
    for _ in range(data.draw(st.integers(min_value=1, max_value=8))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = data.draw(st.integers(min_value=0, max_value=max(0, len(text) - 1)))
        if op == "flip" and text:
            text[pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        elif op == "insert":
            text[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif text:
            del text[pos]
    result = pgp.armor_problem(bytes(text), outgoing=False)
    assert result is None or isinstance(result, str)
    binary = bytearray(BINARY[name])
    pos = data.draw(st.integers(min_value=0, max_value=len(binary) - 1))
    binary[pos] = data.draw(st.integers(min_value=0, max_value=255))
    assert isinstance(pgp.check_openpgp_packets(bytes(binary)), bool)


def with_checksum_line(name: str, line: bytes) -> bytes:
    """The corpus payload with its checksum line replaced by (or added as) ``line``."""
    text = ARMORED[name].rstrip(b"\r\n")
    head, _, _ = text.rpartition(b"\r\n" + pgp.END)
    body, _, last = head.rpartition(b"\r\n")
    if last.startswith(b"="):
        head = body
    return head + b"\r\n" + line + b"\r\n" + pgp.END + b"\r\n"


CHECKSUM_SHAPED = st.from_regex(rb"\A=[A-Za-z0-9+/=]{0,8}[ \t]{0,8}\Z")


@SETTINGS
@given(name=st.sampled_from(VALID_NAMES), line=CHECKSUM_SHAPED)
def test_any_checksum_line_present_malformed_or_wrong_is_accepted(name, line):
    # RFC 9580 6.1: a reader MUST NOT reject armor over its checksum
    binary, problem = pgp.dearmor(with_checksum_line(name, line), outgoing=True)
    assert problem is None, (line, problem)
    assert binary == BINARY[name]


@SETTINGS
@given(name=st.sampled_from(VALID_NAMES), line=st.binary(min_size=1, max_size=40))
def test_the_checksum_line_carries_nothing(name, line):
    """Whatever stands in the checksum line's place: either the armor is refused,
    or the line is checksum-shaped (at most 17 bytes of base64 and blanks) and the
    decoded payload is exactly the one without it.  No other text passes."""
    if b"\r" in line or b"\n" in line:
        return
    binary, problem = pgp.dearmor(with_checksum_line(name, line), outgoing=False)
    if problem is None:
        checksum_shaped = re.fullmatch(rb"=[A-Za-z0-9+/=]{0,8}[ \t]{0,8}", line)
        data_line = re.fullmatch(rb"[A-Za-z0-9+/]+={0,2}", line)
        assert checksum_shaped or data_line, line
        if checksum_shaped:
            assert binary == BINARY[name]


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes_into_the_packet_walk(data):
    problem = pgp.packet_problem(data)
    assert problem is None or isinstance(problem, str)


@SETTINGS
@given(data=st.binary(max_size=512))
def test_random_binary_in_valid_armor(data):
    for text in (armor(data), armor(data, crc=False)):
        # the armor is fine, so the verdict is exactly the packet walk's
        assert pgp.check_armored_payload(text, False) == pgp.check_openpgp_packets(data)


MESSAGE_NAMES = [
    "encrypted",
    "encrypted-b64-part",
    "securejoin-vc",
    "mailer-daemon",
    "asm",
    "mdn",
    "encrypted-deltachat",
]


def call_everything(msg: bytes, text: str) -> None:
    try:
        parsed = [mime.ParsedMessage(msg)]
    except HeaderError as e:  # the one exception it raises: a refused header section
        assert e.reply[:3] in ("552", "554")
        parsed = []
    for m in (msg, *parsed):
        assert isinstance(mime.is_encrypted(m, True), bool)
        assert isinstance(mime.is_encrypted(m, False), bool)
        assert isinstance(mime.is_securejoin(m), bool)
        assert isinstance(mime.is_mailer_daemon_report(m), bool)
        assert isinstance(mime.is_self_sent_autocrypt_setup(m, text, [text]), bool)
        assert mime.from_address(m) is None or "@" in mime.from_address(m)
        problem = mime.encryption_problem(m, True)
        assert problem is None or isinstance(problem, str)
    assert mime.extract_address(text) is None or "@" in mime.extract_address(text)
    assert isinstance(mime.is_null_path(text), bool)
    assert mime.address_domain(text) is None or isinstance(mime.address_domain(text), str)
    assert isinstance(mime.is_domain_literal(text), bool)
    assert isinstance(pgp.check_armored_payload(text, False), bool)
    assert isinstance(pgp.check_armored_payload(msg, True), bool)


@SETTINGS
@given(msg=st.binary(max_size=4096), text=st.text(max_size=200))
def test_random_input_to_every_public_function(msg, text):
    call_everything(msg, text)


@SETTINGS
@given(name=st.sampled_from(MESSAGE_NAMES), data=st.data())
def test_mutated_messages_never_raise(name, data):
    msg = bytearray(load_mail(name))
    for _ in range(data.draw(st.integers(min_value=1, max_value=10))):
        pos = data.draw(st.integers(min_value=0, max_value=len(msg) - 1))
        chunk = data.draw(
            st.sampled_from([b"\r\n", b"\n", b"--", b'"', b";", b"=", b":", b"\x00", b"\xff", b""])
        )
        cut = data.draw(st.integers(min_value=0, max_value=3))
        msg[pos : pos + cut] = chunk
    call_everything(bytes(msg), data.draw(st.text(max_size=50)))


@SETTINGS
@given(
    local=st.from_regex(r"[a-z0-9._+=-]{1,20}", fullmatch=True),
    domain=st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True),
    params=st.sampled_from(["", " SIZE=123", " BODY=8BITMIME", " NOTIFY=NEVER ORCPT=rfc822;x@y"]),
)
def test_extract_address_round_trip(local, domain, params):
    if ".." in local or local.startswith(".") or local.endswith("."):
        return
    if any(lbl.startswith("-") or lbl.endswith("-") for lbl in domain.split(".")):
        return
    addr = f"{local}@{domain}"
    assert mime.extract_address(f"MAIL FROM:<{addr.upper()}>{params}") == addr
    assert mime.extract_address(f"RCPT TO:<{addr}>{params}") == addr
    assert mime.address_domain(addr) == domain
