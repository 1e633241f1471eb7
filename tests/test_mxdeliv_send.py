"""Sending over HTTPS (issue 21, part 3): relays whose port 25 is blocked deliver
to each other over ``POST /mxdeliv``, and over port 25 where the peer has no route.

Three ``make run`` relays share a network namespace of this module's own
(testing.netns), whose firewall (Debian's nftables) refuses the ports the test
blocks, as a provider's does:

* chat.example and other.example: port 25 of both blocked; their mail goes over
  HTTPS, passes the receiver's incoming filter (DKIM verified) and arrives
  encrypted;
* third.example runs with ``mxdeliv_receive = no`` (its /mxdeliv answers 404,
  as a server without the route): mail for it takes port 25;
* with a peer's HTTPS and port 25 both closed, mail waits in Postfix's queue
  and is delivered once either opens (the queue is flushed instead of waiting
  for Postfix's next retry).
"""

from __future__ import annotations

import asyncio
import imaplib
import subprocess
import time
from pathlib import Path

import pytest

from testing.mails import encrypted_message
from testing.netns import Firewall, private_network
from tests.devrelay import DevRelay
from tests.sandbox import world_readable_tempdir

pytestmark = [pytest.mark.relay, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def firewall():
    with private_network():
        fw = Firewall()
        try:
            yield fw
        finally:
            fw.close()


@pytest.fixture(scope="module")
def relays(firewall):
    base = world_readable_tempdir("mxsend-")
    started: list[DevRelay] = []
    try:
        # other.example takes less than chat.example sends: its 413 must bounce
        for name, extra in (("b", "max_message_size = 60000\n"), ("c", "mxdeliv_receive = no\n")):
            domain = {"b": "other.example", "c": "third.example"}[name]
            (base / f"{name}.ini").write_text(
                f"[params]\nmail_domain = {domain}\nmxdeliv_timeout = 10\n{extra}"
            )
        (base / "a.ini").write_text("[params]\nmxdeliv_timeout = 10\n")
        a = DevRelay(base / "a", "--config", str(base / "a.ini"))
        started.append(a)
        for name in ("b", "c"):
            peer = DevRelay(
                base / name, "--config", str(base / f"{name}.ini"), "--peer", str(base / "a")
            )
            started.append(peer)
        b, c = started[1:]
        for domain in ("other.example", "third.example"):
            assert a.wait_line(lambda line, d=domain: f"peered with {d}" in line), a.output
        yield a, b, c
    finally:
        for relay in started:
            relay.stop()
        subprocess.run(["rm", "-rf", str(base)])


def log(relay: DevRelay, name: str) -> str:
    return (relay.state / "log" / name).read_text(errors="replace")


def wait_log(relay: DevRelay, name: str, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while text not in log(relay, name):
        assert time.monotonic() < deadline, f"{text!r} not in {name}:\n{log(relay, name)[-3000:]}"
        time.sleep(0.1)
    return log(relay, name)


def count(inbox: imaplib.IMAP4_SSL) -> int:
    inbox.select("INBOX")
    return len(inbox.search(None, "ALL")[1][0].split())


def send(sender: DevRelay, recipient: DevRelay, size: int = 4096) -> tuple[imaplib.IMAP4_SSL, int]:
    """Encrypted mail from the sender's printed account to the recipient's; the
    recipient's open inbox and its message count before."""
    from_addr, from_pw = sender.printed_account()
    to_addr, to_pw = recipient.printed_account()
    inbox = recipient.imap(to_addr, to_pw)  # creates the account
    before = count(inbox)
    with sender.smtp(from_addr, from_pw) as smtp:
        smtp.sendmail(from_addr, [to_addr], encrypted_message(from_addr, [to_addr], size))
    return inbox, before


def received(inbox: imaplib.IMAP4_SSL, before: int, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while count(inbox) <= before:
        assert time.monotonic() < deadline, "mail was not delivered"
        time.sleep(0.1)
    _, data = inbox.fetch(str(before + 1), "(RFC822)")
    return data[0][1]


def flush(relay: DevRelay) -> None:
    """Postfix's retry of deferred mail now, not minutes later."""
    conf = str(relay.state / "etc/postfix")
    subprocess.run(["postqueue", "-c", conf, "-f"], check=True, capture_output=True)


def test_port_25_blocked_both_ways_mail_goes_over_https(relays, firewall):
    a, b, _ = relays
    firewall.block(a.facts["ports"]["smtp"])
    firewall.block(b.facts["ports"]["smtp"])
    for sender, recipient in ((a, b), (b, a)):
        inbox, before = send(sender, recipient)
        try:
            message = received(inbox, before)
        finally:
            inbox.logout()
        assert b"multipart/encrypted" in message and b"DKIM-Signature" not in message
        domain = recipient.facts["mail_domain"]
        sent = wait_log(sender, "filtermail.log", f"sent to {domain}")
        assert f"via https {domain}" in sent
        # port 25's path at the receiver: Postfix's mxdeliv service, the incoming filter
        # (a DKIM signature of the sender's domain verified), the sender named by PROXY
        assert "postfix/mxdeliv/smtpd" in log(recipient, "postfix.log")
        received_log = log(recipient, "filtermail.log")
        assert "Incoming: Filtering encrypted mail." in received_log
        assert "DKIM verification failed" not in received_log


def test_the_peers_refusal_bounces_with_its_reason(relays, firewall):
    a, b, _ = relays
    firewall.block(b.facts["ports"]["smtp"])  # over HTTPS, as in the first test
    sender_inbox = a.imap(*a.printed_account())
    try:
        before = count(sender_inbox)
        inbox, _ = send(a, b, size=100_000)
        inbox.logout()
        bounce = received(sender_inbox, before)
    finally:
        sender_inbox.logout()
    # Postfix's bounce to the sender quotes the peer's answer to the POST
    reason = b"552 5.3.4 other.example answered 413 to /mxdeliv: larger than 60000 bytes"
    assert reason in bounce.replace(b"\r\n    ", b" ")
    assert "bounced to other.example" in log(a, "filtermail.log")


def test_https_is_verified_against_the_mx_name(relays):
    """Where the domain's policy is "verify", a certificate no CA signed for the
    MX name is no HTTPS delivery: the self-signed one of a make-run relay fails."""
    from chatmaild.common.config import read_config
    from chatmaild.filtermail.delivery import TLSPolicy
    from chatmaild.filtermail.transport import Host, TransportHandler

    a, b, _ = relays
    config = read_config(a.state / "etc/chatmail.ini")
    host = Host("other.example", "127.0.0.1", b.facts["ports"]["newemail"])
    to = b.printed_account()[0]

    async def post(policy):
        handler = TransportHandler(config)
        try:
            return await handler._post(host, policy, "", [to], b"Subject: x\r\n\r\nx\r\n")
        finally:
            await handler.close()

    assert asyncio.run(post(TLSPolicy.VERIFY)) == (None, [])  # no answer: not trusted
    # the same request without the check reaches the route (and is refused: no From)
    first, replies = asyncio.run(post(TLSPolicy.ENCRYPT))
    assert first is not None and first.kind.value == "permanent"
    assert replies[0].startswith("500 5.0.0 other.example said: Invalid FROM header")


def test_without_the_route_at_the_peer_mail_takes_port_25(relays):
    a, _, c = relays
    inbox, before = send(a, c)
    try:
        assert b"multipart/encrypted" in received(inbox, before)
    finally:
        inbox.logout()
    sent = wait_log(a, "filtermail.log", "sent to third.example")
    assert "via smtp third.example" in sent
    # the 404 was no route at all: nothing came in over HTTPS
    assert "postfix/mxdeliv/smtpd" not in log(c, "postfix.log")


@pytest.mark.parametrize("opens", ["smtp", "newemail"])
def test_both_ways_closed_mail_waits_and_goes_when_one_opens(relays, firewall, opens):
    a, b, c = relays
    # other.example for HTTPS opening again (its port 25 stays blocked), third.example for
    # port 25 (it has no route: remembered as SMTP only)
    peer = b if opens == "newemail" else c
    domain = peer.facts["mail_domain"]
    ports = [peer.facts["ports"]["smtp"], peer.facts["ports"]["newemail"]]
    for port in ports:
        firewall.block(port)
    deferred_before = log(a, "filtermail.log").count(f"deferred to {domain}")
    inbox, before = send(a, peer)
    try:
        deadline = time.monotonic() + 60
        while log(a, "filtermail.log").count(f"deferred to {domain}") == deferred_before:
            assert time.monotonic() < deadline, log(a, "filtermail.log")[-3000:]
            time.sleep(0.1)
        queue = subprocess.run(
            ["postqueue", "-c", str(a.state / "etc/postfix"), "-p"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"@{domain}" in queue  # waiting in the queue, not lost, not bounced
        assert count(inbox) == before
        firewall.open(peer.facts["ports"][opens])
        flush(a)
        assert b"multipart/encrypted" in received(inbox, before)
    finally:
        inbox.logout()
        for port in ports:
            if port in firewall.blocked and (port != b.facts["ports"]["smtp"]):
                firewall.open(port)
    way = "https" if opens == "newemail" else "smtp"
    last = [line for line in log(a, "filtermail.log").splitlines() if f"sent to {domain}" in line]
    assert f"via {way} {domain}" in last[-1]


def test_the_ways_are_counted_in_the_log(relays):
    a, _, _ = relays
    lines = Path(a.state / "log/filtermail.log").read_text().splitlines()
    transport = [line for line in lines if "filtermail-transport" in line and " to " in line]
    assert transport and all(
        any(f"{word} to " in line for word in ("sent", "deferred", "bounced")) for line in transport
    )
