"""Outgoing and incoming policy, DKIM and re-injection, with the filters running
in-process against a recording SMTP sink and a loopback DNS server."""

from __future__ import annotations

import socket

import dkim as dkimpy
import pytest

from chatmaild.common.accounts import FLAG_DISABLED, FLAG_ENFORCE_E2EE, AccountStore
from chatmaild.common.ratelimit import RateLimiter
from chatmaild.filtermail.dkim import split_message
from chatmaild.filtermail.headers import MAX_HEADER_SECTION
from chatmaild.filtermail.outgoing import is_passthrough
from testing import mails
from tests.fixtures.filtermail import DOMAIN, OTHER

ALICE = f"alice0001@{DOMAIN}"
BOB = f"bob000001@{DOMAIN}"
REMOTE = f"remote@{OTHER}"


def dkimpy_verifies(message: bytes, dns) -> bool:
    """Independent check with dkimpy's own verify(), keys from the loopback DNS table."""

    def dnsfunc(name, timeout=5):
        values = dns.txt.get(__import__("dns.name").name.from_text(name.decode()))
        return values[0].encode() if values else None

    return dkimpy.verify(message, dnsfunc=dnsfunc)


def sign_other(filters, message: bytes) -> bytes:
    header_block, body_start = split_message(message)
    return filters.other_signer.sign(header_block, message, body_start) + message


def flag(filters, addr: str, name: str) -> None:
    account = AccountStore(filters.config).account(addr)
    account.home.mkdir(parents=True, exist_ok=True)
    account.set_flag(name, True)


# ----------------------------------------------------------------- outgoing


def test_outgoing_encrypted_is_cleaned_signed_and_reinjected(filters):
    c = filters.client(filters.out_port)
    msg = mails.encrypted_message(
        ALICE,
        [REMOTE],
        subject="secret subject",
        extra_headers=("Received: from [192.0.2.7] by x", "X-Mailer: m", "User-Agent: ua"),
    )
    assert c.transaction(ALICE, [REMOTE], msg) == "250 OK"
    (got,) = filters.sink.messages
    assert got.mail_from == ALICE and got.rcpt_tos == [REMOTE]
    head = got.content.split(b"\r\n\r\n")[0]
    assert head.startswith(b"DKIM-Signature: ")
    assert b"\r\nSubject: [...]\r\n" in head
    assert b"secret subject" not in got.content
    for gone in (b"Received:", b"X-Mailer:", b"User-Agent:", b"192.0.2.7"):
        assert gone not in got.content
    assert got.content.endswith(msg.split(b"\r\n\r\n", 1)[1])  # body untouched
    assert dkimpy_verifies(got.content, filters.dns)
    # over-signing: an added From (or Subject) breaks the signature
    assert not dkimpy_verifies(b"From: <evil@x.example>\r\n" + got.content, filters.dns)
    sig = dkimpy.DKIM(got.content).headers[0][1]
    assert b"c=relaxed/simple" in sig and b"s=dkim" in sig and b"d=chat.example" in sig
    h = dict(dkimpy.util.parse_tag_value(sig))[b"h"].replace(b" ", b"").split(b":")
    assert h.count(b"from") == 2 and h.count(b"autocrypt") == 1 and b"content-type" in h


def test_outgoing_signs_only_mail_that_leaves_the_relay(filters):
    c = filters.client(filters.out_port)
    local = mails.encrypted_message(ALICE, [BOB])
    assert c.transaction(ALICE, [BOB], local) == "250 OK"
    mixed = mails.encrypted_message(ALICE, [BOB, REMOTE.upper()])
    assert c.transaction(ALICE, [BOB, REMOTE.upper()], mixed) == "250 OK"
    got_local, got_mixed = filters.sink.messages
    assert b"DKIM-Signature:" not in got_local.content
    assert b"\r\nSubject: [...]\r\n" in got_local.content  # still cleaned
    assert got_mixed.content.startswith(b"DKIM-Signature: ")
    assert dkimpy_verifies(got_mixed.content, filters.dns)


def test_outgoing_cleartext_rejected_523(filters):
    c = filters.client(filters.out_port)
    r = c.transaction(ALICE, [REMOTE], mails.plain_message(ALICE, [REMOTE]))
    assert r == "523 Encryption Needed: Invalid Unencrypted Mail"
    # fake armor in a text/plain body is still cleartext
    fake = mails.plain_message(
        ALICE, [REMOTE], "-----BEGIN PGP MESSAGE-----\r\n\r\nHi!\r\n-----END PGP MESSAGE-----\r\n"
    )
    assert c.transaction(ALICE, [REMOTE], fake).startswith("523 ")
    assert filters.sink.messages == []


def test_outgoing_securejoin_passes(filters):
    c = filters.client(filters.out_port)
    assert c.transaction(ALICE, [REMOTE], mails.securejoin_message(ALICE, REMOTE)) == "250 OK"
    assert len(filters.sink.messages) == 1


def test_outgoing_forged_from_500(filters):
    c = filters.client(filters.out_port)
    msg = mails.encrypted_message(BOB, [REMOTE])
    assert c.transaction(ALICE, [REMOTE], msg) == f"500 Invalid FROM <{BOB}> for <{ALICE}>"
    nofrom = msg.replace(b"From: ", b"X-From: ")
    assert c.transaction(ALICE, [REMOTE], nofrom).startswith("500 Invalid FROM header")
    assert filters.sink.messages == []


def test_outgoing_rate_limit_450(filters_factory):
    filters = filters_factory(max_user_send_per_minute=1, max_user_send_burst_size=3)
    c = filters.client(filters.out_port)
    msg = mails.encrypted_message(ALICE, [REMOTE])
    for _ in range(3):
        assert c.transaction(ALICE, [REMOTE], msg) == "250 OK"
    r = c.transaction(ALICE, [REMOTE], msg)
    assert r.startswith(f"450 4.7.1: Too much mail from {ALICE}")
    # other senders are not affected, and the null sender is never limited
    assert c.cmd(f"MAIL FROM:<{BOB}>").startswith("250")
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("MAIL FROM:<>").startswith("250")


def test_outgoing_disabled_sender_and_recipients(filters):
    flag(filters, ALICE, FLAG_DISABLED)
    flag(filters, BOB, FLAG_DISABLED)
    c = filters.client(filters.out_port)
    assert c.transaction(ALICE, [REMOTE], mails.encrypted_message(ALICE, [REMOTE])) == "250 OK"
    other = f"carol0001@{DOMAIN}"
    msg = mails.encrypted_message(other, [BOB, REMOTE])
    assert c.transaction(other, [BOB, REMOTE], msg) == "250 OK"
    assert c.transaction(other, [BOB], mails.encrypted_message(other, [BOB])) == "250 OK"
    (got,) = filters.sink.messages  # sender dropped; BOB removed; all-disabled dropped
    assert got.rcpt_tos == [REMOTE]


def test_outgoing_dot_lines_survive(filters):
    c = filters.client(filters.out_port)
    msg = mails.securejoin_message(ALICE, REMOTE).replace(
        b"Secure-Join: vc-request\r\n--", b"Secure-Join: vc-request\r\n.\r\n..x\r\n--"
    )
    c.transaction(ALICE, [REMOTE], msg)
    # not a valid securejoin any more (body changed) -> refused, but parse was on unstuffed data
    assert filters.sink.messages == []
    big = mails.encrypted_message(ALICE, [REMOTE], size=3 * 2**20)
    assert c.transaction(ALICE, [REMOTE], big) == "250 OK"
    assert filters.sink.messages[0].content.endswith(big.split(b"\r\n\r\n", 1)[1])


def test_outgoing_reinject_failures_are_passed_back(filters):
    c = filters.client(filters.out_port)
    msg = mails.encrypted_message(ALICE, [REMOTE])
    filters.sink.reply = "452 4.3.1 Insufficient system storage"
    assert c.transaction(ALICE, [REMOTE], msg).startswith("452 4.3.1 Insufficient")
    filters.sink.reply = "250 OK"
    filters.sink.rcpt_reply = "550 5.1.1 no such user"
    assert c.transaction(ALICE, [REMOTE], msg).startswith("550 5.1.1")
    filters.sink.rcpt_reply = None
    assert c.transaction(ALICE, [REMOTE], msg) == "250 OK"  # pooled connection still fine
    listener = filters.servers[0].sockets[0]
    family, address = listener.family, listener.getsockname()
    # the sink stops listening: new connections fail.  (Not wait_closed(): since
    # Python 3.12 it also waits for the pooled connection, which stays open.)
    filters.servers[0].close()
    # (a UNIX socket's file may be gone, as Python 3.13 removes it, or refuse)
    with (
        socket.socket(family, socket.SOCK_STREAM) as probe,
        pytest.raises((ConnectionRefusedError, FileNotFoundError)),
    ):
        probe.connect(address)


def test_a_partly_refused_envelope_delivers_nothing(filters):
    # MAIL, RCPTs and DATA are pipelined: DATA gets 354 for the accepted recipient,
    # and the re-injection hangs up before any content, so nobody gets the message
    c = filters.client(filters.out_port)
    msg = mails.encrypted_message(ALICE, [BOB, REMOTE])
    filters.sink.refused_rcpts = {REMOTE}
    assert c.transaction(ALICE, [BOB, REMOTE], msg).startswith("550 5.1.1 refused recipient")
    filters.sink.refused_rcpts = set()
    assert filters.sink.messages == []
    assert c.transaction(ALICE, [BOB, REMOTE], msg) == "250 OK"  # a fresh connection works
    assert filters.sink.messages[0].rcpt_tos == [BOB, REMOTE]


def test_reinject_connection_refused_is_4xx(filters_factory):
    nowhere = "/nonexistent/reinject"
    filters = filters_factory(
        postfix_reinject_socket=nowhere, postfix_reinject_socket_incoming=nowhere
    )
    c = filters.client(filters.out_port)
    msg = mails.encrypted_message(ALICE, [REMOTE])
    assert c.transaction(ALICE, [REMOTE], msg).startswith("451 4.4.1")


# ----------------------------------------------------------------- incoming


def test_incoming_signed_accepted(filters):
    c = filters.client(filters.in_port)
    msg = sign_other(filters, mails.encrypted_message(REMOTE, [ALICE]))
    assert c.transaction(REMOTE, [ALICE], msg) == "250 OK"
    (got,) = filters.sink.messages
    assert got.content == msg and got.mail_from == REMOTE


def test_incoming_relaxed_relaxed_and_simple_simple_signatures(filters, dkim_keys):
    c = filters.client(filters.in_port)
    path = dkim_keys[OTHER][0]
    for canon in ((b"relaxed", b"relaxed"), (b"simple", b"simple")):
        msg = mails.encrypted_message(REMOTE, [ALICE])
        sig = dkimpy.sign(msg, b"dkim", OTHER.encode(), path.read_bytes(), canonicalize=canon)
        assert c.transaction(REMOTE, [ALICE], sig + msg) == "250 OK"


def test_incoming_unsigned_misaligned_tampered_554(filters):
    c = filters.client(filters.in_port)
    msg = mails.encrypted_message(REMOTE, [ALICE])
    assert c.transaction(REMOTE, [ALICE], msg) == "554 5.7.1 No DKIM signature found"
    third = f"x@third.{OTHER}"
    misaligned = sign_other(filters, mails.encrypted_message(third, [ALICE]))
    r = c.transaction(third, [ALICE], misaligned)
    assert r == "554 5.7.1 No valid DKIM signature found"
    signed = sign_other(filters, msg)
    tampered_body = signed.replace(b"Version: 1", b"Version: 1 ")
    assert c.transaction(REMOTE, [ALICE], tampered_body).startswith("554 5.7.1 No valid")
    tampered_head = signed.replace(b"Subject: ...", b"Subject: changed")
    assert c.transaction(REMOTE, [ALICE], tampered_head).startswith("554 5.7.1 No valid")
    filters.dns.remove(f"dkim._domainkey.{OTHER}")
    assert c.transaction(REMOTE, [ALICE], signed).startswith("554 5.7.1 No valid")
    assert filters.sink.messages == []


@pytest.mark.parametrize("how", ["timeout", "servfail"])
def test_incoming_dns_trouble_is_451(filters, how):
    filters.dns.fail(f"dkim._domainkey.{OTHER}", how)
    c = filters.client(filters.in_port)
    msg = sign_other(filters, mails.encrypted_message(REMOTE, [ALICE]))
    assert c.transaction(REMOTE, [ALICE], msg).startswith("451 4.7.1")
    assert filters.sink.messages == []


def test_a_dns_outage_is_logged_once_not_per_message(filters, caplog):
    """Every message deferred (451) while DKIM's DNS fails; the log names the cause
    once, and the summary (at the end of the minute, or at the stop) counts the rest."""
    import logging

    from chatmaild.filtermail.incoming import LOG_DEFERRED

    filters.dns.fail(f"dkim._domainkey.{OTHER}", "servfail")
    c = filters.client(filters.in_port)
    with caplog.at_level(logging.INFO, logger="filtermail"):
        for _ in range(20):
            msg = sign_other(filters, mails.encrypted_message(REMOTE, [ALICE]))
            assert c.transaction(REMOTE, [ALICE], msg).startswith("451 4.7.1")
    lines = [r.getMessage() for r in caplog.records if LOG_DEFERRED in r.getMessage()]
    assert len(lines) == 1 and REMOTE in lines[0] and "DNS" in lines[0], lines
    assert not any("DKIM verification failed" in r.getMessage() for r in caplog.records)
    assert filters.sink.messages == []


def test_a_timed_summary_writes_itself(caplog):
    import asyncio
    import logging

    from chatmaild.common.logsummary import TimedSummaryLog

    async def run() -> None:
        summary = TimedSummaryLog(logging.getLogger("t.summary"), period=0.2)
        for n in range(5):
            summary.note("cause", f"client-{n % 2}")
        await asyncio.sleep(0.5)  # the window ends: its summary without any tick
        summary.note("cause", "client-9")  # a new window: logged at once
        summary.note("cause", "client-9")
        summary.close()  # held back: written; no timer left

    with caplog.at_level(logging.INFO, logger="t.summary"):
        asyncio.run(run())
    assert [r.getMessage() for r in caplog.records] == [
        "cause: client-0",
        "cause: 4 more from 2 client(s) in the last 0 s",
        "cause: client-9",
        "cause: 1 more from 1 client(s) in the last 0 s",
    ]


def test_incoming_cleartext_and_e2ee_flag(filters):
    flag(filters, BOB, FLAG_ENFORCE_E2EE)
    c = filters.client(filters.in_port)
    plain = sign_other(filters, mails.plain_message(REMOTE, [ALICE]))
    assert c.transaction(REMOTE, [ALICE], plain) == "250 OK"
    plain2 = sign_other(filters, mails.plain_message(REMOTE, [ALICE, BOB]))
    assert c.transaction(REMOTE, [ALICE, BOB], plain2).startswith("523 Encryption Needed")
    enc = sign_other(filters, mails.encrypted_message(REMOTE, [BOB]))
    assert c.transaction(REMOTE, [BOB], enc) == "250 OK"
    assert len(filters.sink.messages) == 2


def test_incoming_envelope_mismatch_resets_return_path(filters):
    c = filters.client(filters.in_port)
    msg = sign_other(filters, mails.encrypted_message(REMOTE, [ALICE]))
    srs = f"SRS0=abc=de={OTHER}=remote@forwarder.example"
    assert c.transaction(srs, [ALICE], msg) == "250 OK"
    assert filters.sink.messages[0].mail_from == ""


def test_incoming_mailer_daemon_report_passes(filters):
    daemon = f"MAILER-DAEMON@{OTHER}"
    report = (
        f"From: {daemon}\r\nTo: <{ALICE}>\r\nSubject: Undelivered Mail\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
        "--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n"
        "--b1--\r\n"
    ).encode()
    flag(filters, ALICE, FLAG_ENFORCE_E2EE)
    c = filters.client(filters.in_port)
    assert c.transaction("", [ALICE], sign_other(filters, report)) == "250 OK"


def test_incoming_domain_literal_sender_needs_no_dkim(filters):
    c = filters.client(filters.in_port)
    sender = "one@[192.0.2.1]"
    msg = mails.encrypted_message(sender, [ALICE])
    assert c.transaction(sender, [ALICE], msg) == "250 OK"


# ----------------------------------------------------------------- pieces


def test_gcra_burst_then_rate():
    now = [1000.0]
    limiter = RateLimiter(per_minute=60, burst=10, clock=lambda: now[0])
    assert all(limiter.check("a") == 0 for _ in range(10))
    assert limiter.check("a") > 0
    assert limiter.check("b") == 0
    now[0] += 1.0
    assert limiter.check("a") == 0
    assert limiter.check("a") > 0
    now[0] += 3600
    assert all(limiter.check("a") == 0 for _ in range(10))
    limiter.check("zz")
    assert len(limiter) == 2  # stale keys were collected


def test_plain_message_helper_roundtrip():
    # the test helper itself must produce what the filter expects (CRLF, one From)
    msg = mails.plain_message(ALICE, [REMOTE], "a\nb")
    assert b"\r\na\r\nb\r\n" in msg and msg.count(b"From: ") == 1


@pytest.mark.parametrize("line", [b"From : <x@chat.example>", b"Subject :x", b"X-Bogus"])
def test_malformed_header_section_is_refused_both_ways(filters, line):
    outgoing = mails.encrypted_message(ALICE, [REMOTE])
    outgoing = outgoing.replace(b"\r\nTo: ", b"\r\n" + line + b"\r\nTo: ", 1)
    reply = filters.client(filters.out_port).transaction(ALICE, [REMOTE], outgoing)
    assert reply.startswith("554 5.6.0 Malformed header section: ")
    # dkimpy cannot sign the bad lines: added after signing (our check comes first)
    incoming = sign_other(filters, mails.encrypted_message(REMOTE, [ALICE]))
    incoming = incoming.replace(b"\r\nTo: ", b"\r\n" + line + b"\r\nTo: ", 1)
    reply = filters.client(filters.in_port).transaction(REMOTE, [ALICE], incoming)
    assert reply.startswith("554 5.6.0 Malformed header section: ")
    assert filters.sink.messages == []


def test_incoming_message_without_empty_line_is_refused_552(filters):
    """~30 MB of header fields cost ~30 s of CPU (MIME parse, then dkimpy's);
    the header section must end within its limit."""
    message = f"From: <{REMOTE}>\r\n".encode() + b"X: y\r\n" * 200_000
    reply = filters.client(filters.in_port).transaction(REMOTE, [ALICE], message)
    assert reply == f"552 5.3.4 Header section larger than {MAX_HEADER_SECTION} bytes"
    assert filters.sink.messages == []


@pytest.mark.parametrize("checksum", [b"=AAA", b"=3D7rkM", b""])
def test_malformed_or_missing_armor_checksum_passes(filters, checksum):
    msg = mails.encrypted_message(ALICE, [BOB])
    crc_start = msg.rindex(b"\r\n=", 0, msg.index(b"-----END PGP MESSAGE")) + 2
    crc_end = msg.index(b"\r\n", crc_start) + 2
    msg = msg[:crc_start] + (checksum + b"\r\n" if checksum else b"") + msg[crc_end:]
    assert filters.client(filters.out_port).transaction(ALICE, [BOB], msg) == "250 OK"


@pytest.mark.parametrize(
    "mail_from,rcpts,ok",
    [
        ("echo@chat.example", ["x@y.example"], True),
        ("ECHO@chat.example", ["x@y.example", "z@w.example"], True),
        ("alice@chat.example", ["xstore@testrun.org"], True),
        ("alice@chat.example", ["XSTORE@TESTRUN.ORG"], True),
        ("alice@chat.example", ["a@privacy.example", "b@Privacy.Example"], True),
        ("alice@chat.example", ["xstore@testrun.org", "a@privacy.example"], True),
        ("alice@chat.example", ["xstore@testrun.org", "x@y.example"], False),  # all must match
        ("alice@chat.example", ["a@sub.privacy.example"], False),  # @domain is that domain only
        ("alice@chat.example", ["privacy.example@evil.example"], False),
        ("alice@chat.example", ["other@testrun.org"], False),
        ("alice@chat.example", [], False),
    ],
)
def test_is_passthrough(mail_from, rcpts, ok):
    senders = ("echo@chat.example",)
    recipients = ("xstore@testrun.org", "@privacy.example")
    assert is_passthrough(mail_from, rcpts, senders, recipients) is ok


def test_outgoing_passthrough(filters_factory):
    filters = filters_factory(
        passthrough_senders=ALICE, passthrough_recipients=f"@{OTHER} xstore@testrun.org"
    )
    c = filters.client(filters.out_port)
    # a passthrough sender's cleartext leaves, to anyone (and is signed when it leaves)
    assert c.transaction(ALICE, ["x@y.example"], mails.plain_message(ALICE, ["x@y.example"])) == (
        "250 OK"
    )
    # another sender's cleartext only to passthrough recipients, all of them
    plain = mails.plain_message(BOB, [REMOTE, "xstore@testrun.org"])
    assert c.transaction(BOB, [REMOTE, "xstore@testrun.org"], plain) == "250 OK"
    assert c.transaction(BOB, [REMOTE, ALICE], plain).startswith("523 ")
    # the other rules still apply: the From must be the sender
    forged = mails.plain_message(BOB, [REMOTE])
    assert c.transaction(ALICE, [REMOTE], forged).startswith("500 Invalid FROM")
    assert [m.rcpt_tos for m in filters.sink.messages] == [
        ["x@y.example"],
        [REMOTE, "xstore@testrun.org"],
    ]
    assert filters.sink.messages[0].content.startswith(b"DKIM-Signature: ")
    # incoming mail is not affected: passthrough is about what our users send
    flag(filters, ALICE, FLAG_ENFORCE_E2EE)
    incoming = sign_other(filters, mails.plain_message(REMOTE, [ALICE]))
    reply = filters.client(filters.in_port).transaction(REMOTE, [ALICE], incoming)
    assert reply.startswith("523 ")
