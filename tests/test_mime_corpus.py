"""chatmaild.filtermail.mime over the real-tool corpus in tests/mail-data, plus edge cases."""

from __future__ import annotations

import pytest

from chatmaild.filtermail import mime
from chatmaild.filtermail.mime import (
    ParsedMessage,
    address_domain,
    encryption_problem,
    extract_address,
    from_address,
    is_domain_literal,
    is_encrypted,
    is_mailer_daemon_report,
    is_null_path,
    is_securejoin,
    is_self_sent_autocrypt_setup,
)
from tests.fixtures.maildata import load_mail, mail_names

A, B = "alice@example.org", "bob@example.org"

# name: (encrypted outgoing, encrypted incoming, securejoin, mailer-daemon, self-sent ASM)
TRUTH = {
    "encrypted": (1, 1, 0, 0, 0),
    "encrypted-ipv4": (1, 1, 0, 0, 0),
    "encrypted-ipv6": (1, 1, 0, 0, 0),
    "encrypted-gpg-partial": (1, 1, 0, 0, 0),
    "encrypted-gpg-multi": (1, 1, 0, 0, 0),
    "encrypted-symmetric": (1, 1, 0, 0, 0),
    "encrypted-sq": (1, 1, 0, 0, 0),
    "encrypted-nocrc": (1, 1, 0, 0, 0),
    "encrypted-b64-part": (1, 1, 0, 0, 0),
    "encrypted-deltachat": (1, 1, 0, 0, 0),
    "encrypted-deltachat-group": (1, 1, 0, 0, 0),
    "securejoin-v3-deltachat": (1, 1, 0, 0, 0),
    "encrypted-version-header": (0, 1, 0, 0, 0),
    "encrypted-protonmail": (0, 1, 0, 0, 0),
    "encrypted-three-parts": (0, 0, 0, 0, 0),
    "armor-truncated": (0, 0, 0, 0, 0),
    "truncated": (0, 0, 0, 0, 0),
    "trailing-garbage": (0, 0, 0, 0, 0),
    "literal": (0, 0, 0, 0, 0),
    "compressed": (0, 0, 0, 0, 0),
    "signed-compressed": (0, 0, 0, 0, 0),
    "signed-uncompressed": (0, 0, 0, 0, 0),
    "signature-only": (0, 0, 0, 0, 0),
    "fake-encrypted": (0, 0, 0, 0, 0),
    "plain": (0, 0, 0, 0, 0),
    "mdn": (0, 0, 0, 0, 0),
    "securejoin-vc": (0, 0, 1, 0, 0),
    "securejoin-vg": (0, 0, 1, 0, 0),
    "securejoin-vc-deltachat": (0, 0, 1, 0, 0),
    "securejoin-vc-fake": (0, 0, 0, 0, 0),
    "securejoin-vc-extra-part": (0, 0, 0, 0, 0),
    "asm": (0, 0, 0, 0, 1),
    "mailer-daemon": (0, 0, 0, 1, 0),
}


def test_truth_table_covers_the_whole_corpus():
    assert sorted(TRUTH) == mail_names()


@pytest.mark.parametrize("name", sorted(TRUTH))
@pytest.mark.parametrize("parsed", [False, True])
def test_corpus_truth_table(name, parsed):
    data = load_mail(name, from_addr=A, to_addr=A if name == "asm" else B)
    msg = ParsedMessage(data) if parsed else data
    enc_out, enc_in, sj, md, asm = TRUTH[name]
    assert is_encrypted(msg, outgoing=True) == bool(enc_out), encryption_problem(msg, True)
    assert is_encrypted(msg, outgoing=False) == bool(enc_in), encryption_problem(msg, False)
    assert is_securejoin(msg) == bool(sj)
    assert is_mailer_daemon_report(msg) == bool(md)
    assert is_self_sent_autocrypt_setup(msg, A, [A]) == bool(asm)


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_lf_line_endings_do_not_change_the_structure_verdicts(name):
    """LF-only files (e.g. saved from a client) still parse; the armor needs CRLF."""
    data = load_mail(name, to_addr=A if name == "asm" else B).replace(b"\r\n", b"\n")
    _, _, sj, md, asm = TRUTH[name]
    # the armor check insists on CRLF, unless the payload part is base64 transfer-encoded
    assert is_encrypted(data, outgoing=False) == (name == "encrypted-b64-part")
    assert is_securejoin(data) == bool(sj)
    assert is_mailer_daemon_report(data) == bool(md)
    assert is_self_sent_autocrypt_setup(data, A, [A]) == bool(asm)


def test_reasons_name_the_problem():
    assert "armor header" in encryption_problem(load_mail("encrypted-protonmail"), True)
    assert "truncated" in encryption_problem(load_mail("truncated"), True)
    assert "type 11" in encryption_problem(load_mail("literal"), True)
    assert "type 8" in encryption_problem(load_mail("compressed"), True)
    assert "text/plain" in encryption_problem(load_mail("fake-encrypted"), True)


def test_from_address_of_corpus():
    assert from_address(load_mail("encrypted", from_addr="Alice@Example.ORG")) == A
    assert from_address(load_mail("encrypted-ipv4")) == "one@[192.0.2.0]"
    assert from_address(load_mail("encrypted-ipv6")) == "one@[ipv6:2001:db8::1]"
    assert from_address(load_mail("mailer-daemon")) == "mailer-daemon@example.org"


def replace_header(data: bytes, old: bytes, new: bytes) -> bytes:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert old in head
    return head.replace(old, new, 1) + sep + body


class TestFrom:
    base = load_mail("encrypted")

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (b"Alice <alice@example.org>", A),
            (b'"Alice, the first" <Alice@example.org>', A),
            (b"=?utf-8?q?Al=C3=AFce?= <alice@example.org>", A),
            (b"alice@example.org", A),
            (b"alice@example.org (comment)", A),
            (b"team: alice@example.org;", A),
            (b"<alice@[192.0.2.1]>", "alice@[192.0.2.1]"),
            (b"Alice <alice@[IPv6:2001:db8::1]>", "alice@[ipv6:2001:db8::1]"),
            (b"alice@[192.0.2.1] (relay)", "alice@[192.0.2.1]"),
            (b"<alice@example.org>, <mallory@example.org>", None),
            (b"team: alice@example.org, mallory@example.org;", None),
            (b"", None),
            (b"nobody", None),
            (b"<a@b@example.org>", None),
            (b"<@example.org>", None),
        ],
    )
    def test_values(self, value, expected):
        data = replace_header(self.base, b"From: <alice@example.org>", b"From: " + value)
        assert from_address(data) == expected

    def test_second_from_header_is_refused(self):
        data = replace_header(
            self.base, b"From: <alice@example.org>", b"From: <alice@example.org>\r\nFrom: <x@y.org>"
        )
        assert from_address(data) is None

    def test_no_from(self):
        assert (
            from_address(replace_header(self.base, b"From: <alice@example.org>\r\n", b"")) is None
        )


class TestEncryptedStructure:
    base = load_mail("encrypted")

    def test_preamble_and_epilogue_are_ignored(self):
        data = self.base.replace(b"\r\n\r\n--Gx2J", b"\r\n\r\nThis is OpenPGP/MIME\r\n--Gx2J", 1)
        assert data != self.base
        assert is_encrypted(data + b"epilogue\r\n", outgoing=True)

    def test_content_type_case_is_ignored(self):
        data = replace_header(self.base, b"multipart/encrypted", b"Multipart/Encrypted")
        data = data.replace(b"application/octet-stream", b"Application/Octet-Stream")
        assert is_encrypted(data, outgoing=True)

    @pytest.mark.parametrize(
        ("old", "new"),
        [
            (b"Version: 1\r\n", b"Version: 2\r\n"),
            (b"Version: 1\r\n", b"Version: 1\r\nX\r\n"),
            (b"application/pgp-encrypted; charset", b"text/plain; charset"),
            (b"application/octet-stream", b"text/plain"),
            (b"application/octet-stream", b"multipart/mixed"),
            (b"Content-Transfer-Encoding: 7bit\r\n\r\n-----BEGIN",
             b"Content-Transfer-Encoding: x-uuencode\r\n\r\n-----BEGIN"),
            (b"--Gx2JcB3pDwVnF7tq--", b"--Gx2JcB3pDwVnF7tq"),  # no close delimiter
            (b"--Gx2JcB3pDwVnF7tq--", b""),
            (b"-----END PGP MESSAGE-----", b"-----END PGP MESSAGE-----\r\nP.S. cleartext"),
        ],
    )  # fmt: skip
    def test_mutations_are_refused(self, old, new):
        data = self.base.replace(old, new, 1)
        assert data != self.base
        assert not is_encrypted(data, outgoing=False)

    def test_boundary_prefix_inside_a_part_is_not_a_delimiter(self):
        data = self.base.replace(
            b"PGP/MIME version identification\r\n",
            b"PGP/MIME version identification\r\n",
        ).replace(b"\r\nVersion: 1\r\n", b"\r\n--Gx2JcB3pDwVnF7tqX\r\nVersion: 1\r\n", 1)
        assert data != self.base
        # the fake delimiter line stays inside part 1, whose body is then not "Version: 1"
        assert "Version: 1" in encryption_problem(data, False)

    def test_not_multipart_or_no_boundary(self):
        data = replace_header(self.base, b'boundary="Gx2JcB3pDwVnF7tq"', b"x=y")
        assert not is_encrypted(data, False)
        assert ParsedMessage(data).parts(limit=5) is None

    def test_header_only_message(self):
        head = self.base.partition(b"\r\n\r\n")[0]
        assert not is_encrypted(head, False)
        assert not is_encrypted(head + b"\r\n\r\n", False)

    def test_parts_limit(self):
        msg = ParsedMessage(load_mail("encrypted-three-parts"))
        assert msg.parts(limit=2) is None
        assert [p.content_type for p in msg.parts(limit=3)] == [
            "application/pgp-encrypted",
            "application/octet-stream",
            "text/plain",
        ]

    def test_body_is_not_copied_into_parts(self):
        msg = ParsedMessage(self.base)
        payload = msg.parts(limit=2)[1].body
        assert isinstance(payload, memoryview) and payload.obj is msg.data


class TestSecureJoin:
    base = load_mail("securejoin-vc")

    @pytest.mark.parametrize(
        ("old", "new"),
        [
            (b"Secure-Join: vc-request\r\nSecure-Join-Invitenumber",
             b"Secure-Join: VC-request\r\nSecure-Join-Invitenumber"),
            (b"Secure-Join: vc-request\r\nSecure-Join-Invitenumber",
             b"Secure-Join: vb-request\r\nSecure-Join-Invitenumber"),
            (b"Secure-Join: vc-request\r\nSecure-Join-Invitenumber",
             b"Secure-Join: vg-request\r\nSecure-Join-Invitenumber"),  # body says vc
            (b"Secure-Join: vc-request\r\nSecure-Join-Invitenumber",
             b"Secure-Join: vc-request\r\nSecure-Join: vc-request\r\nSecure-Join-Invitenumber"),
            (b"Content-Type: text/plain", b"Content-Type: text/html"),
            (b"\r\nSecure-Join: vc-request\r\n\r\n--",
             b"\r\nSecure-Join: vc-request. Buy!\r\n\r\n--"),
        ],
    )  # fmt: skip
    def test_mutations_are_refused(self, old, new):
        data = self.base.replace(old, new, 1)
        assert data != self.base
        assert not is_securejoin(data)

    def test_body_case_and_whitespace_are_ignored(self):
        head, sep, body = self.base.partition(b"\r\n\r\n")
        body = body.replace(b"Secure-Join: vc-request", b"  secure-join: VC-REQUEST ")
        assert is_securejoin(head + sep + body)

    def test_not_multipart(self):
        data = replace_header(self.base, b"multipart/mixed;", b"text/plain;")
        assert not is_securejoin(data)


class TestAutocryptSetup:
    base = load_mail("asm", from_addr=A, to_addr=A)

    def test_only_self_sent(self):
        assert is_self_sent_autocrypt_setup(self.base, A, [A])
        assert is_self_sent_autocrypt_setup(self.base, "Alice@Example.org", ["ALICE@example.org"])
        assert not is_self_sent_autocrypt_setup(self.base, A, [B])
        assert not is_self_sent_autocrypt_setup(self.base, A, [A, B])
        assert not is_self_sent_autocrypt_setup(self.base, A, [])
        assert not is_self_sent_autocrypt_setup(self.base, B, [B])  # From is alice
        assert not is_self_sent_autocrypt_setup(self.base, "", [A])

    def test_subject_and_type(self):
        data = replace_header(self.base, b"Subject: Autocrypt Setup Message", b"Subject: Hi")
        assert not is_self_sent_autocrypt_setup(data, A, [A])
        data = replace_header(self.base, b"multipart/mixed", b"text/plain")
        assert not is_self_sent_autocrypt_setup(data, A, [A])


class TestMailerDaemon:
    base = load_mail("mailer-daemon")

    @pytest.mark.parametrize(
        ("old", "new"),
        [
            (b"Auto-Submitted: auto-replied\r\n", b""),
            (b"Auto-Submitted: auto-replied\r\n", b"Auto-Submitted: \r\n"),
            (b"From: MAILER-DAEMON@example.org", b"From: postmaster@example.org"),
            (b"From: MAILER-DAEMON@example.org", b"From: mailer-daemon-x@example.org"),
            (b"report-type=delivery-status", b"report-type=disposition-notification"),
            (b"multipart/report;", b"multipart/mixed;"),
        ],
    )
    def test_mutations_are_refused(self, old, new):
        data = replace_header(self.base, old, new)
        assert not is_mailer_daemon_report(data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("MAIL FROM:<t2@example.org> SOMETHING=X", "t2@example.org"),
        ("mail from: <T2@Example.org> SIZE=100 BODY=8BITMIME", "t2@example.org"),
        ("RCPT TO:<t3@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;t3@example.org",
         "t3@example.org"),
        ("<srs0=hhh=tt=example.com=t4@fwd.example>", "srs0=hhh=tt=example.com=t4@fwd.example"),
        ("SRS0=HHH=TT=example.com=t4@fwd.example", "srs0=hhh=tt=example.com=t4@fwd.example"),
        ("Foo Bar <t5@example.org>", "t5@example.org"),
        ('"Foo <Bar>" <t6@example.org>', "t6@example.org"),
        ("t7@[192.0.2.0]", "t7@[192.0.2.0]"),
        ("<t7@[192.0.2.0]>", "t7@[192.0.2.0]"),
        ("t8@[IPv6:2001:db8::1]", "t8@[ipv6:2001:db8::1]"),
        ("<t8@[IPv6:2001:db8::1]>", "t8@[ipv6:2001:db8::1]"),
        ("RCPT TO:<t8@[IPv6:2001:db8::1]> NOTIFY=NEVER", "t8@[ipv6:2001:db8::1]"),
        ("<@relay.example:t9@example.org>", "t9@example.org"),
        ('<"john doe"@example.org>', '"john doe"@example.org'),
        ("  t10@example.org  ", "t10@example.org"),
        ("<>", None),
        ("MAIL FROM:<>", None),
        ("", None),
        ("<a@b@example.org>", None),
        ("<@example.org>", None),
        ("<t@>", None),
        ("<t@[300.0.0.1]>", None),
        ("<t@[IPv6:zz::1]>", None),
        ("<t@exa mple.org>", None),
        ("<t@example.org", None),
        ("<t..x@example.org>", "t..x@example.org"),  # RFC-invalid but seen in the wild
        ("<t@example..org>", None),
        ("<t\r\n@example.org>", None),
    ],
)  # fmt: skip
def test_extract_address(text, expected):
    assert extract_address(text) == expected


def test_null_path():
    assert is_null_path("<>")
    assert is_null_path("MAIL FROM:<>")
    assert is_null_path("MAIL FROM: <> SIZE=10")
    assert not is_null_path("MAIL FROM:<a@b.org>")
    assert not is_null_path("<>x")
    assert not is_null_path("")


def test_domains():
    assert address_domain("a@Example.ORG") == "example.org"
    assert address_domain("a@[192.0.2.1]") == "[192.0.2.1]"
    assert address_domain("nodomain") is None
    assert address_domain("a@") is None
    assert is_domain_literal("[192.0.2.1]")
    assert is_domain_literal("[IPv6:2001:db8::1]")
    assert is_domain_literal("[ipv6:2001:db8::1]")
    assert not is_domain_literal("[2001:db8::1]")
    assert not is_domain_literal("example.org")
    assert not is_domain_literal("[example.org]")


def test_public_api_is_exported():
    for name in mime.__all__:
        assert hasattr(mime, name)


@pytest.mark.parametrize("name", ["encrypted", "encrypted-deltachat", "securejoin-vc", "asm"])
def test_bytearray_input_gives_the_same_verdicts_and_stays_resizable(name):
    data = load_mail(name, to_addr=A if name == "asm" else B)
    buf = bytearray(data)
    msg = ParsedMessage(buf)
    assert msg.data is buf  # no copy
    assert is_encrypted(msg, True) == is_encrypted(data, True)
    assert is_securejoin(msg) == is_securejoin(data)
    assert from_address(msg) == from_address(data)
    assert is_self_sent_autocrypt_setup(msg, A, [A]) == is_self_sent_autocrypt_setup(data, A, [A])
    buf += b"x"  # no memoryview export is left behind


def test_large_partial_length_message():
    """A multi-megabyte payload in 8 KiB partial chunks (as GnuPG writes from a pipe)."""
    import os

    from tests.test_pgp_basic import armor, new_packet, partial_packet

    binary = new_packet(1, b"\x03" + os.urandom(100)) + partial_packet(
        18, b"\x01" + os.urandom(3_000_000), 13
    )
    enc = load_mail("encrypted")
    head, _, rest = enc.partition(b"-----BEGIN PGP MESSAGE-----")
    tail = rest[rest.index(b"-----END PGP MESSAGE-----") + 25 :]
    big = head + armor(binary).rstrip(b"\r\n") + tail
    assert is_encrypted(big, outgoing=True), encryption_problem(big, True)
    broken = big.replace(b"\r\n-----END", b"\r\nA-----END", 1)  # one stray base64 char
    assert not is_encrypted(broken, outgoing=True)
