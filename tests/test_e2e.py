"""End to end: the real Delta Chat core against relays started like `make run`.

Two relays (chat.example and other.example) run every component; their DKIM
keys are published on a loopback DNS server, and each routes the other's
domain to its port 25, so federation goes through STARTTLS, DKIM signing and
DKIM verification for real.  Raw SMTP covers what the core refuses to send.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import os
import smtplib
import time
from pathlib import Path

import pytest

from chatmaild.relay import Relay
from chatmaild.relay.dns import LoopbackDNS
from testing.dcclient import (
    relay_dclogin,
    securejoin,
    wait_event,
    wait_incoming,
    wait_incoming_text,
)
from testing.httpsink import HttpSink
from testing.mails import encrypted_message, plain_message

pytestmark = [pytest.mark.relay, pytest.mark.timeout(240)]

FULL = ("postfix", "dovecot", "doveauth", "lastlogin", "metadata", "filtermail", "newemail")


@pytest.fixture(scope="module")
def dns():
    with LoopbackDNS() as server:
        yield server


@pytest.fixture(scope="module")
def push_sink():
    with HttpSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def relays(dns, push_sink):
    from tests.fixtures.relay import RelayPool

    pool = RelayPool()
    try:
        a = pool(
            {
                "mail_domain": "chat.example",
                "dns_resolver": dns.address,
                "notification_url": push_sink.url,
            },
            FULL,
        )
        b = pool({"mail_domain": "other.example", "dns_resolver": dns.address}, FULL)
        for relay in (a, b):
            dns.set_txt(*relay.dkim_record())
        a.add_peer(b)
        b.add_peer(a)
        yield a, b
    finally:
        pool.close()


@pytest.fixture(scope="module")
def relay_a(relays) -> Relay:
    return relays[0]


def test_accounts_from_dclogin_and_new_securejoin_both_ways(relay_a, clients):
    import http.client
    import json

    from chatmaild.relay import client_tls_context

    alice = clients.account(relay_a, name="alice")
    # bob comes from the onboarding endpoint, as an app scanning DCACCOUNT: would
    conn = http.client.HTTPSConnection(
        relay_a.host, relay_a.ports["newemail"], context=client_tls_context(), timeout=10
    )
    conn.request("POST", "/new")
    creds = json.loads(conn.getresponse().read())
    conn.close()
    bob = clients.dc.add_account()
    bob.add_transport_from_qr(creds["dclogin_url"])
    bob.bring_online()
    assert bob.list_transports()[0]["addr"] == creds["email"]

    securejoin(alice, bob)
    chat = alice.create_chat(bob)
    chat.send_text("hello bob")
    got = wait_incoming_text(bob, "hello bob")
    assert got.show_padlock
    bob.create_chat(alice).send_text("hello alice")
    got = wait_incoming_text(alice, "hello alice")
    assert got.show_padlock


def test_group_of_three(relay_a, clients):
    a, b, c = (clients.account(relay_a, name=n) for n in ("ann", "ben", "cid"))
    securejoin(a, b)
    securejoin(a, c)
    group = a.create_group("three")
    group.add_contact(a.create_contact(b), a.create_contact(c))
    group.send_text("hi all")
    for acc in (b, c):
        assert wait_incoming_text(acc, "hi all").show_padlock
    # a reply from a member reaches both others
    b_group = b.get_chat_by_id(wait_for_chat(b, "three"))
    b_group.accept()
    b_group.send_text("hi from ben")
    for acc in (a, c):
        assert wait_incoming_text(acc, "hi from ben").show_padlock


def wait_for_chat(acc, name: str) -> int:
    for item in acc.get_chatlist():
        chat = acc.get_chat_by_id(item.id) if hasattr(item, "id") else item
        if chat.get_basic_snapshot().name == name:
            return chat.id
    raise AssertionError(f"no chat {name!r}")


def test_ten_megabyte_attachment(relay_a, clients, tmp_path):
    a, b = clients.account(relay_a), clients.account(relay_a)
    securejoin(a, b)
    path = tmp_path / "big.bin"
    payload = os.urandom(10 * 1024 * 1024)
    path.write_bytes(payload)
    a.create_chat(b).send_file(str(path))
    msg = wait_incoming(b, timeout=120)
    snap = msg.get_snapshot()
    assert snap.show_padlock and snap.file_bytes == len(payload)
    if snap.download_state != "Done":
        # the core shows large messages first as a placeholder; the user taps download
        b._rpc.download_full_message(b.id, msg.id)
        deadline = time.monotonic() + 120
        while snap.download_state != "Done" and time.monotonic() < deadline:
            wait_event(b, lambda e: e["kind"] in ("MsgsChanged", "IncomingMsg"), timeout=120)
            snap = msg.get_snapshot()
    assert snap.download_state == "Done"
    assert snap.show_padlock
    assert Path(snap.file).read_bytes() == payload


def test_federation_between_two_relays(relays, clients, dns):
    a_relay, b_relay = relays
    alice = clients.account(a_relay, name="alice")
    olga = clients.account(b_relay, name="olga")
    assert olga.list_transports()[0]["addr"].endswith("@other.example")
    securejoin(alice, olga)
    alice.create_chat(olga).send_text("across relays")
    assert wait_incoming_text(olga, "across relays").show_padlock
    olga.create_chat(alice).send_text("and back")
    assert wait_incoming_text(alice, "and back").show_padlock
    # it went over HTTPS (/mxdeliv: TLS on the web port) into port 25's path, with a
    # verified DKIM signature
    b_postfix = (b_relay.log_dir / "postfix.log").read_text()
    assert "postfix/mxdeliv/smtpd" in b_postfix
    a_postfix = (a_relay.log_dir / "postfix.log").read_text()
    assert "status=sent (250 2.0.0 delivered over HTTPS to other.example)" in a_postfix
    # each side looked up the other's DKIM key: signatures were verified
    assert {a_relay.dkim_record()[0] + ".", b_relay.dkim_record()[0] + "."} <= set(dns.queries)


def test_unsigned_mail_from_a_peer_is_refused(relays, dns):
    """Port 25 without a DKIM signature of the From domain: refused by filtermail."""
    _, b_relay = relays
    rcpt, rpw = b_relay.new_credentials()
    b_relay.imap(rcpt, rpw).logout()
    from chatmaild.relay import client_tls_context

    with smtplib.SMTP(b_relay.host, b_relay.ports["smtp"], timeout=30) as smtp:
        smtp.starttls(context=client_tls_context())
        msg = encrypted_message("forger@chat.example", [rcpt])
        with pytest.raises(smtplib.SMTPDataError) as exc:
            smtp.sendmail("forger@chat.example", [rcpt], msg)
    assert exc.value.smtp_code == 554


def test_raw_smtp_refusals(relay_a):
    sender, spw = relay_a.new_credentials()
    other, _ = relay_a.new_credentials()
    with relay_a.smtp(sender, spw) as smtp:
        # cleartext to another domain: the core refuses this itself, the relay too
        with pytest.raises(smtplib.SMTPDataError) as exc:
            smtp.sendmail(
                sender, ["x@outside.example"], plain_message(sender, ["x@outside.example"])
            )
        assert exc.value.smtp_code == 523
        # From header is not the envelope sender
        with pytest.raises(smtplib.SMTPDataError) as exc:
            smtp.sendmail(sender, [other], encrypted_message(other, [other]))
        assert exc.value.smtp_code == 500
    # envelope sender is not the login
    with relay_a.smtp(sender, spw) as smtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            smtp.sendmail(other, [sender], encrypted_message(other, [sender]))
        assert exc.value.recipients[sender][0] == 553


def test_delivered_headers_carry_no_client_traces(relay_a):
    """What a recipient's IMAP shows: no client IP, software, Received or DKIM headers."""
    sender, spw = relay_a.new_credentials()
    rcpt, rpw = relay_a.new_credentials()
    relay_a.imap(rcpt, rpw).logout()
    msg = encrypted_message(
        sender,
        [rcpt],
        subject="secret subject",
        extra_headers=(
            "User-Agent: Foomail/1.0",
            "X-Mailer: Foomail",
            "X-Originating-IP: [10.1.2.3]",
        ),
    )
    with relay_a.smtp(sender, spw) as smtp:
        smtp.sendmail(sender, [rcpt], msg)
    deadline = time.monotonic() + 20
    while True:
        conn = relay_a.imap(rcpt, rpw)
        conn.select("INBOX")
        _, nums = conn.search(None, "ALL")
        if nums[0] or time.monotonic() > deadline:
            _, data = conn.fetch(nums[0].split()[0], "(RFC822)")
            conn.logout()
            break
        conn.logout()
        time.sleep(0.1)
    raw = data[0][1]
    got = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert got.get_content_type() == "multipart/encrypted"
    assert got["Subject"] == "[...]"
    for header in (
        "Received",
        "User-Agent",
        "X-Mailer",
        "X-Originating-IP",
        "DKIM-Signature",
        "Authentication-Results",
    ):
        assert header not in got, header
    assert b"127.0.0.1" not in raw and b"10.1.2.3" not in raw


def test_push_notification_for_submitted_mail(relay_a, push_sink):
    """Device token over IMAP METADATA; mail through submission and filtermail pushes it."""
    sender, spw = relay_a.new_credentials()
    rcpt, rpw = relay_a.new_credentials()
    imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
    conn = relay_a.imap(rcpt, rpw)
    try:
        typ, data = conn._simple_command(
            "SETMETADATA", "INBOX", '(/private/devicetoken "e2e-device-token")'
        )
        assert typ == "OK", data
    finally:
        conn.logout()
    with relay_a.smtp(sender, spw) as smtp:
        smtp.sendmail(sender, [rcpt], encrypted_message(sender, [rcpt]))
    assert push_sink.wait_for(lambda s: s.count("e2e-device-token") >= 1, timeout=30)
    # one delivery, one push
    assert push_sink.count("e2e-device-token") == 1


def test_dclogin_link_matches_relay(relay_a):
    link = relay_dclogin(relay_a, "abc@chat.example", "p w")
    assert f"ip={relay_a.ports['imaps']}" in link and "p=p%20w" in link
