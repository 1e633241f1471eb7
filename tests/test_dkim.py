"""DKIM pieces: streaming body hashes equal dkimpy's, signatures verify with
dkimpy itself, the bounce-signing milter, and the dkim-keygen command."""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct

import dkim as dkimpy
import dns.name
import pytest
from dkim.canonicalization import Relaxed, Simple

from chatmaild.admin.main import main as admin_main
from chatmaild.common.config import write_config
from chatmaild.filtermail import dkim as fdkim
from chatmaild.filtermail.milter import MilterSession
from tests.fixtures.filtermail import DOMAIN, OTHER, Ed25519Key


def dnsfunc_for(dns_server):
    def dnsfunc(name, timeout=5):
        values = dns_server.txt.get(dns.name.from_text(name.decode()))
        return values[0].encode() if values else None

    return dnsfunc


@pytest.mark.parametrize("chunk", [1, 7, 1024 * 1024])
def test_body_hash_equals_dkimpy(chunk, monkeypatch):
    monkeypatch.setattr(fdkim, "RELAXED_CHUNK", chunk)
    rnd = random.Random(chunk)
    alphabet = [b"a", b" ", b"\t", b"\r\n", b"\r\n", b"x  y", b"."]
    for _ in range(1500):
        body = b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
        if rnd.random() < 0.8 and not body.endswith(b"\r\n"):
            body += b"\r\n"
        content = b"Subject: t\r\n\r\n" + body
        start = content.index(b"\r\n\r\n") + 4
        for canon, cls in ((b"simple", Simple), (b"relaxed", Relaxed)):
            expected = hashlib.sha256(cls.canonicalize_body(body)).digest()
            assert fdkim.body_hash(content, start, canon) == expected, (canon, body)


def test_split_message():
    assert fdkim.split_message(b"A: b\r\n\r\nbody\r\n") == (b"A: b\r\n", 8)
    assert fdkim.split_message(b"A: b\r\n") == (b"A: b\r\n", 6)
    assert fdkim.split_message(b"\r\nbody") == (b"", 2)


def test_signature_verifies_with_dkimpy(dkim_keys, loopback_dns):
    signer = fdkim.Signer.from_file(DOMAIN, "dkim", str(dkim_keys[DOMAIN][0]))
    for body in (b"", b"\r\n\r\n", b".dot\r\n  spaced  \r\n\r\n", b"x" * 300_000 + b"\r\n"):
        msg = b"From: <a@chat.example>\r\nTo: <b@x.example>\r\nSubject: s\r\n\r\n" + body
        header_block, start = fdkim.split_message(msg)
        signed = signer.sign(header_block, msg, start) + msg
        assert dkimpy.verify(signed, dnsfunc=dnsfunc_for(loopback_dns))
        assert not dkimpy.verify(signed + b"more\r\n", dnsfunc=dnsfunc_for(loopback_dns))


def test_bad_key_is_a_clear_error(tmp_path):
    with pytest.raises(fdkim.DKIMError):
        fdkim.Signer(DOMAIN, "dkim", b"not a key")


def test_parse_resolver():
    assert fdkim.parse_resolver("") is None
    assert fdkim.parse_resolver("127.0.0.1") == ("127.0.0.1", 53)
    assert fdkim.parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert fdkim.parse_resolver("[::1]:5353") == ("::1", 5353)


# ----------------------------------------------------------------- milter


def milter_run(session: MilterSession, packets: list[tuple[bytes, bytes]]) -> list[bytes]:
    out = []
    for cmd, data in packets:
        replies = asyncio.run(session.command(cmd, data))
        out.extend(replies or [])
    return out


def optneg() -> tuple[bytes, bytes]:
    return b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)


def bounce_packets(from_value: bytes, extra=()) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"From", from_value),
        (b"Subject", b"Undelivered Mail Returned to Sender"),
        (b"To", b"<a@chat.example>"),
        (b"Auto-Submitted", b"auto-replied"),
        *extra,
    ]
    packets = [optneg(), (b"D", b"Ci\0ABC\0")]
    packets += [(b"L", b"%s\0 %s\0" % h) for h in headers]
    packets += [(b"N", b""), (b"B", b"This is the mail system.\r\n\r\n.line\r\n"), (b"E", b"")]
    return packets


def test_milter_signs_bounce(dkim_keys, loopback_dns):
    signer = fdkim.Signer.from_file(DOMAIN, "dkim", str(dkim_keys[DOMAIN][0]))
    session = MilterSession(signer, DOMAIN, 10**6)
    from_value = b"MAILER-DAEMON@chat.example (Mail Delivery System)"
    replies = milter_run(session, bounce_packets(from_value))
    assert replies[0][:1] == b"O"
    (negotiated,) = struct.unpack(">I", replies[0][9:13])
    assert negotiated & 0x1  # connect step skipped
    insert = replies[1]
    assert insert[:1] == b"i" and replies[-1] == b"c"
    name, value = insert[5:].rstrip(b"\0").split(b"\0")
    assert name == b"DKIM-Signature"
    message = (
        b"DKIM-Signature: " + value.replace(b"\n", b"\r\n") + b"\r\n"
        b"From: " + from_value + b"\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        b"To: <a@chat.example>\r\nAuto-Submitted: auto-replied\r\n\r\n"
        b"This is the mail system.\r\n\r\n.line\r\n"
    )
    assert dkimpy.verify(message, dnsfunc=dnsfunc_for(loopback_dns))


def test_milter_leaves_foreign_and_signed_mail(dkim_keys):
    signer = fdkim.Signer.from_file(DOMAIN, "dkim", str(dkim_keys[DOMAIN][0]))
    session = MilterSession(signer, DOMAIN, 10**6)
    replies = milter_run(session, bounce_packets(f"x@{OTHER}".encode()))
    assert replies[1:] == [b"c"]
    signed = [(b"DKIM-Signature", b"v=1; a=rsa-sha256; d=chat.example; s=dkim; b=x")]
    replies = milter_run(session, bounce_packets(b"MAILER-DAEMON@chat.example", signed))
    assert replies[1:] == [b"c"]
    assert milter_run(session, [(b"Q", b"")]) == []


# ----------------------------------------------------------------- dkim-keygen


def test_dkim_keygen_command(tmp_path, capsys):
    key = tmp_path / "keys" / "dkim.private"
    ini = write_config(tmp_path / "chatmail.ini", mail_domain=DOMAIN, dkim_key_path=str(key))
    assert admin_main(["--config", str(ini), "dkim-keygen"]) == 0
    first = capsys.readouterr().out.strip()
    assert first.startswith("opendkim._domainkey.chat.example. 3600 IN TXT ")
    assert '"v=DKIM1; k=rsa; p=' in first
    assert key.stat().st_mode & 0o777 == 0o640
    fdkim.Signer(DOMAIN, "opendkim", key.read_bytes())
    # run again: the existing key is kept and the same record printed
    assert admin_main(["--config", str(ini), "dkim-keygen", "--selector", "opendkim"]) == 0
    assert capsys.readouterr().out.strip() == first
    assert admin_main(["--config", str(ini), "dkim-keygen", "--force", "--bits", "1024"]) == 0
    assert capsys.readouterr().out.strip() != first


# ----------------------------------------------------------------- verification


def verify(dns_server, message: bytes, domain: str) -> fdkim.VerifyResult:
    verifier = fdkim.Verifier(fdkim.KeyFetcher(dns_server.address, timeout=2))
    header_block, body_start = fdkim.split_message(message)
    return asyncio.run(verifier.verify(header_block, message, body_start, domain))


# RFC 8463 Appendix A: one message signed with Ed25519 (selector brisbane)
# and with RSA (selector test), and the two key records
RFC8463_SIGNATURES = {
    "brisbane": (
        b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
        b" d=football.example.com; i=@football.example.com;\r\n"
        b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
        b" subject : date : message-id : from : subject : date;\r\n"
        b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
        b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
        b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
    ),
    "test": (
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
        b" d=football.example.com; i=@football.example.com;\r\n"
        b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
        b" date : message-id : from : subject : date;\r\n"
        b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
        b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
        b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
        b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n"
    ),
}
RFC8463_MESSAGE = (
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
)
RFC8463_RECORDS = {
    "brisbane": "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
    "test": "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6"
    "Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3"
    "rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB",
}


@pytest.fixture
def football_dns(loopback_dns):
    for selector, record in RFC8463_RECORDS.items():
        loopback_dns.set_txt(f"{selector}._domainkey.football.example.com", record)
    return loopback_dns


@pytest.mark.parametrize("selector", ["brisbane", "test"])
def test_rfc8463_example_verifies(football_dns, selector):
    message = RFC8463_SIGNATURES[selector] + RFC8463_MESSAGE
    result = verify(football_dns, message, "football.example.com")
    assert result.ok, result.detail
    assert result.detail == f"d=football.example.com s={selector}"
    tampered = message.replace(b"dinner ready", b"dinner READY")
    result = verify(football_dns, tampered, "football.example.com")
    assert not result.ok and "header signature invalid" in result.detail


def test_rfc8463_both_signatures(football_dns):
    message = RFC8463_SIGNATURES["brisbane"] + RFC8463_SIGNATURES["test"] + RFC8463_MESSAGE
    assert verify(football_dns, message, "football.example.com").ok
    # with the Ed25519 key gone, the RSA signature still carries the message
    football_dns.set_txt("brisbane._domainkey.football.example.com", "v=DKIM1; k=ed25519; p=")
    result = verify(football_dns, message, "football.example.com")
    assert result.ok and result.detail.endswith("s=test")


def test_ed25519_signature_by_dkimpy_verifies(loopback_dns, ed25519_key):
    loopback_dns.set_txt(f"ed._domainkey.{OTHER}", ed25519_key.record())
    message = b"From: <x@other.example>\r\nTo: <a@chat.example>\r\nSubject: s\r\n\r\nbody\r\n"
    signed = ed25519_key.sign(message, OTHER)
    assert b"a=ed25519-sha256" in signed
    result = verify(loopback_dns, signed, OTHER)
    assert result.ok, result.detail
    assert not verify(loopback_dns, signed.replace(b"body", b"evil"), OTHER).ok
    # an added (unsigned) From breaks it, as for RSA
    assert not verify(
        loopback_dns, signed.replace(b"From:", b"From: <y@x.example>\r\nFrom:"), OTHER
    ).ok


@pytest.mark.parametrize(
    "record,why",
    [
        ("v=DKIM1; k=ed25519; p=", "revoked"),
        ("v=DKIM1; k=ed25519; p=AAAA", "not an Ed25519 public key"),
        ("v=DKIM1; k=ed25519; p=!!!!", "not an Ed25519 public key"),
        ("v=DKIM1; k=ed25519; s=tlsrpt; p=PUBLIC", "not for email"),
        ("v=DKIM1; k=ed25519; h=sha1; p=PUBLIC", "does not allow sha256"),
        ("v=DKIM1; p=PUBLIC", "k=rsa key for a=ed25519-sha256"),
        ("v=DKIM1; k=rsa; p=PUBLIC", "k=rsa key for a=ed25519-sha256"),
        ("v=DKIM1; k=ed25519; p=OTHER", "header signature invalid"),
    ],
)
def test_ed25519_key_record_problems(loopback_dns, ed25519_key, record, why):
    other = Ed25519Key.generate()
    record = record.replace("PUBLIC", ed25519_key.public.decode())
    loopback_dns.set_txt(f"ed._domainkey.{OTHER}", record.replace("OTHER", other.public.decode()))
    message = b"From: <x@other.example>\r\nTo: <a@chat.example>\r\n\r\nbody\r\n"
    result = verify(loopback_dns, ed25519_key.sign(message, OTHER), OTHER)
    assert not result.ok and why in result.detail, result.detail


def test_rsa_signature_against_an_ed25519_record_fails(dkim_keys, loopback_dns, ed25519_key):
    loopback_dns.set_txt(f"dkim._domainkey.{OTHER}", ed25519_key.record())
    signer = fdkim.Signer.from_file(OTHER, "dkim", str(dkim_keys[OTHER][0]))
    message = b"From: <x@other.example>\r\nTo: <a@chat.example>\r\n\r\nbody\r\n"
    header_block, start = fdkim.split_message(message)
    result = verify(loopback_dns, signer.sign(header_block, message, start) + message, OTHER)
    assert not result.ok and "k=ed25519 key for a=rsa-sha256" in result.detail
