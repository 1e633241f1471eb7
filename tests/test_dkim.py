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

from chatmaild.admin import main as admin_main
from chatmaild.config import write_config
from chatmaild.filtermail import dkim as fdkim
from chatmaild.filtermail.milter import MilterSession
from tests.fixtures.filtermail import DOMAIN, OTHER


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
