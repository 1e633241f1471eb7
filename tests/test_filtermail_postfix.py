"""filtermail behind real Postfix: two federated loopback relays (chat.example and
other.example) whose DKIM keys are served by a loopback DNS server.

A relay's incoming filter accepts only mail with a valid aligned DKIM
signature, so mail (and bounces) arriving at the other relay prove that the
sending relay signed them.
"""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from chatmaild.filtermail.dkim import Signer, public_value, split_message, txt_record
from chatmaild.filtermail.headers import MAX_HEADER_SECTION
from chatmaild.relay.dns import LoopbackDNS
from chatmaild.relay.stack import Relay, _connectable
from testing import mails
from testing.imapparse import envelope_addresses, fetch_items
from testing.maildirs import stored_message
from tests.sandbox import world_readable_tempdir

pytestmark = [pytest.mark.postfix, pytest.mark.timeout(240)]

COMPONENTS = ["postfix", "dovecot", "doveauth", "filtermail"]
PASSTHROUGH_SENDER = "passthru1@chat.example"  # relay a's passthrough_senders
PASSTHROUGH_RECIPIENT = "xstore001@chat.example"  # relay a's passthrough_recipients


def start_milter(relay: Relay) -> subprocess.Popen | None:
    """The bounce-signing milter, unless the relay already runs it."""
    if _connectable(relay.config.filtermail_milter_socket):
        return None
    logf = open(relay.log_dir / "filtermail-milter-test.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [relay.layout.program("filtermail"), "--config", str(relay.ini_path), "milter"],
        stdout=logf,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while not _connectable(relay.config.filtermail_milter_socket):
        assert proc.poll() is None and time.monotonic() < deadline, "milter did not start"
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def fed(dkim_keys):
    """Two relays peered with each other; yields (a, b, dns)."""
    dns = LoopbackDNS().start()
    root = world_readable_tempdir("fed-")
    common = {"dns_resolver": dns.address, "dkim_dns_timeout": 2}
    a = Relay(
        root / "a",
        {"mail_domain": "chat.example", "max_user_send_per_minute": 1,
         "max_user_send_burst_size": 3, "passthrough_senders": PASSTHROUGH_SENDER,
         "passthrough_recipients": PASSTHROUGH_RECIPIENT, **common},
        components=COMPONENTS,
    )  # fmt: skip
    b = Relay(root / "b", {"mail_domain": "other.example", **common}, components=COMPONENTS)
    milters = []
    try:
        for relay in (a, b):
            relay.start()
            milters.append(start_milter(relay))
            key = Path(relay.config.dkim_key_path).read_bytes()
            name = f"{relay.config.dkim_selector}._domainkey.{relay.mail_domain}"
            dns.set_txt(name, txt_record(public_value(key)))
        # the test key of other.example, for mail we sign ourselves
        dns.set_txt("dkim._domainkey.other.example", txt_record(dkim_keys["other.example"][1]))
        dns.set_txt("slow._domainkey.other.example", txt_record(dkim_keys["other.example"][1]))
        dns.fail("slow._domainkey.other.example", "timeout")
        a.add_peer(b)
        b.add_peer(a)
        yield a, b, dns
    finally:
        for proc in milters:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        a.stop()
        b.stop()
        dns.stop()
        shutil.rmtree(root, ignore_errors=True)


def account(relay: Relay) -> tuple[str, str]:
    addr, password = relay.new_credentials()
    relay.imap(addr, password).logout()  # creates the account
    return addr, password


def wait_for_mail(relay: Relay, addr: str, marker: bytes, timeout: float = 20) -> bytes:
    home = Path(relay.config.mailboxes_dir) / addr
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in home.rglob("*"):
            if path.is_file() and path.parent.name in ("new", "cur"):
                data = stored_message(path)
                if marker in data:
                    return data
        time.sleep(0.1)
    raise AssertionError(f"no mail with {marker!r} for {addr}; postfix log:\n" + tail(relay))


def tail(relay: Relay) -> str:
    text = ""
    for name in ("postfix.log", "filtermail.log"):
        path = relay.log_dir / name
        if path.exists():
            text += f"== {name}\n" + "\n".join(path.read_text().splitlines()[-15:]) + "\n"
    return text


def port25(relay: Relay) -> smtplib.SMTP:
    conn = smtplib.SMTP("127.0.0.1", relay.config.smtp_port, timeout=60)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn.starttls(context=ctx)
    conn.ehlo("mx.other.example")
    return conn


def submit_code(relay: Relay, addr: str, password: str, rcpts: list[str], msg: bytes):
    with relay.smtp(addr, password) as conn:
        try:
            conn.sendmail(addr, rcpts, msg)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as e:
            # Postfix passes MAIL FROM to the proxy with the first RCPT
            code, text = next(iter(e.recipients.values()))
            return code, text.decode()
    return 250, ""


def test_submission_encrypted_leaves_cleaned_and_signed(fed):
    a, b, _ = fed
    alice, pw = account(a)
    bob, _ = account(b)
    msg = mails.encrypted_message(
        alice, [bob], subject="secret subject", extra_headers=("X-Mailer: leaky 1.0",)
    )
    assert submit_code(a, alice, pw, [bob], msg) == (250, "")
    # b's incoming filter only takes mail with a valid signature of chat.example
    got = wait_for_mail(b, bob, b"-----BEGIN PGP MESSAGE-----")
    head = got.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in got else got.split(b"\n\n", 1)[0]
    assert b"Subject: [...]" in head
    assert b"secret subject" not in got and b"leaky" not in got


def test_submission_rejections(fed):
    a, b, _ = fed
    alice, pw = account(a)
    bob, _ = account(b)
    code, text = submit_code(a, alice, pw, [bob], mails.plain_message(alice, [bob]))
    assert code == 523 and "Encryption Needed" in text
    carol, pw2 = account(a)
    forged = mails.encrypted_message(bob, [bob])
    code, text = submit_code(a, carol, pw2, [bob], forged)
    assert code == 500 and "Invalid FROM" in text


def test_submission_rate_limit(fed):
    a, b, _ = fed
    dave, pw = account(a)
    bob, _ = account(b)
    for _ in range(3):
        assert submit_code(a, dave, pw, [bob], mails.encrypted_message(dave, [bob]))[0] == 250
    code, text = submit_code(a, dave, pw, [bob], mails.encrypted_message(dave, [bob]))
    assert code == 450 and "Too much mail from" in text


def signed(msg: bytes, dkim_keys, selector: str = "dkim") -> bytes:
    signer = Signer.from_file("other.example", selector, str(dkim_keys["other.example"][0]))
    header_block, start = split_message(msg)
    return signer.sign(header_block, msg, start) + msg


def test_incoming_port25_dkim(fed, dkim_keys):
    a, _, _ = fed
    bob, _ = account(a)
    sender = "remote@other.example"
    good = signed(mails.encrypted_message(sender, [bob], subject="good one"), dkim_keys)
    with port25(a) as conn:
        conn.sendmail(sender, [bob], good)
    assert b"good one" in wait_for_mail(a, bob, b"good one")

    def refused(message: bytes) -> tuple[int, str]:
        with port25(a) as conn, pytest.raises(smtplib.SMTPDataError) as e:
            conn.sendmail(sender, [bob], message)
        return e.value.smtp_code, e.value.smtp_error.decode()

    unsigned = mails.encrypted_message(sender, [bob])
    assert refused(unsigned) == (554, "5.7.1 No DKIM signature found")
    third = "x@third.example"
    misaligned = signed(mails.encrypted_message(third, [bob]), dkim_keys)
    with port25(a) as conn, pytest.raises(smtplib.SMTPDataError) as e:
        conn.sendmail(third, [bob], misaligned)
    assert e.value.smtp_code == 554
    tampered = good.replace(b"good one", b"evil one")
    code, text = refused(tampered)
    assert code == 554 and "No valid DKIM signature" in text
    slow = signed(mails.encrypted_message(sender, [bob]), dkim_keys, selector="slow")
    with port25(a) as conn, pytest.raises(smtplib.SMTPDataError) as e:
        conn.sendmail(sender, [bob], slow)
    assert 400 <= e.value.smtp_code < 500


def test_bounce_leaves_signed(fed):
    """Mail from other.example to an unknown chat.example user bounces; the bounce is
    made by chat.example's Postfix and must be DKIM-signed (by the milter) to be
    accepted back at other.example."""
    a, b, _ = fed
    erin, pw = account(b)
    nobody = "nobody999@chat.example"
    message = mails.encrypted_message(erin, [nobody], subject="to nobody")
    assert submit_code(b, erin, pw, [nobody], message) == (250, "")
    bounce = wait_for_mail(b, erin, b"Undelivered Mail Returned to Sender", timeout=40)
    assert b"MAILER-DAEMON@chat.example" in bounce


def test_incoming_port25_from_ip_literal_sender(fed):
    """An IP-literal relay's mail passes on the daemon's interpreter (Debian's
    Python refused it while addresses went through email.utils); no DKIM needed."""
    a, _, _ = fed
    bob, _ = account(a)
    for sender in ("one@[192.0.2.1]", "two@[IPv6:2001:db8::1]"):
        message = mails.encrypted_message(sender, [bob], subject=f"from {sender}")
        with port25(a) as conn:
            conn.sendmail(sender, [bob], message)
        assert f"from {sender}".encode() in wait_for_mail(a, bob, f"from {sender}".encode())


def inbox_senders(relay: Relay, addr: str, password: str) -> dict[bytes, list[str]]:
    """Message-ID -> the From addresses Dovecot shows in the IMAP ENVELOPE."""
    conn = relay.imap(addr, password)
    try:
        conn.select("INBOX")
        _, data = conn.fetch("1:*", "(ENVELOPE)")
    finally:
        conn.logout()
    items = fetch_items(data) if data and data[0] else []
    senders = {}
    for i in range(0, len(items), 2):  # seq, (ENVELOPE (...))
        envelope = items[i + 1][1]
        senders[envelope[9]] = envelope_addresses(envelope, "from")
    return senders


OBSOLETE_NAMES = [
    b"From : <%(victim)s>",
    b"From\t: <%(victim)s>",
    b"FROM  :<%(victim)s>",
]


@pytest.mark.parametrize("second_from", OBSOLETE_NAMES)
def test_a_second_from_spelled_with_space_before_colon_is_refused(fed, second_from):
    """RFC 5322 4.5 obsolete syntax: Postfix and Dovecot read ``From :`` as a
    From field, so it must count as one here too; the recipient must never be
    shown a second author."""
    a, _, _ = fed
    alice, pw = account(a)
    bob, bob_pw = account(a)
    victim = f"victim@{a.mail_domain}"
    attack = mails.encrypted_message(alice, [bob], subject="attack").replace(
        b"\r\nTo: ", b"\r\n" + second_from % {b"victim": victim.encode()} + b"\r\nTo: ", 1
    )
    code, text = submit_code(a, alice, pw, [bob], attack)
    control = mails.encrypted_message(alice, [bob], subject="control")
    assert submit_code(a, alice, pw, [bob], control) == (250, "")
    wait_for_mail(a, bob, control.split(b"Message-ID: ")[1].split(b"\r\n")[0])
    senders = inbox_senders(a, bob, bob_pw)
    assert all(found == [alice] for found in senders.values()), senders
    assert (code, text[:9]) == (554, "5.6.0 Mal"), text


def test_incoming_port25_second_from_with_space_before_colon_is_refused(fed, dkim_keys):
    """The same on port 25, with a valid DKIM signature of the sender's domain."""
    a, _, _ = fed
    bob, bob_pw = account(a)
    sender = "remote@other.example"
    attack = mails.encrypted_message(sender, [bob], subject="attack").replace(
        b"\r\nTo: ", f"\r\nFrom : <victim@{a.mail_domain}>\r\nTo: ".encode(), 1
    )
    with port25(a) as conn, pytest.raises(smtplib.SMTPDataError) as e:
        conn.sendmail(sender, [bob], signed(attack, dkim_keys))
    control = signed(mails.encrypted_message(sender, [bob], subject="control"), dkim_keys)
    with port25(a) as conn:
        conn.sendmail(sender, [bob], control)
    wait_for_mail(a, bob, control.split(b"Message-ID: ")[1].split(b"\r\n")[0])
    assert all(found == [sender] for found in inbox_senders(a, bob, bob_pw).values())
    assert e.value.smtp_code == 554 and e.value.smtp_error.startswith(b"5.6.0 Malformed")


def test_incoming_port25_message_without_empty_line_is_refused(fed):
    """Without an empty line a message is all header: the section must end
    within its limit (a 29 MB one cost ~30 s of CPU before)."""
    a, _, _ = fed
    bob, _ = account(a)
    sender = "remote@other.example"
    message = f"From: <{sender}>\r\n".encode() + b"X: y\r\n" * 200_000
    with port25(a) as conn, pytest.raises(smtplib.SMTPDataError) as e:
        conn.sendmail(sender, [bob], message)
    assert e.value.smtp_code == 552
    assert (
        e.value.smtp_error
        == f"5.3.4 Header section larger than {MAX_HEADER_SECTION} bytes".encode()
    )


def test_incoming_port25_ed25519_dkim(fed, ed25519_key):
    """A domain that signs only with Ed25519 (RFC 8463) reaches our users."""
    a, _, dns = fed
    bob, _ = account(a)
    sender = "ed@other.example"
    dns.set_txt("ed._domainkey.other.example", ed25519_key.record())
    message = mails.encrypted_message(sender, [bob], subject="signed with ed25519")
    with port25(a) as conn:
        conn.sendmail(sender, [bob], ed25519_key.sign(message, "other.example", "ed"))
    assert b"signed with ed25519" in wait_for_mail(a, bob, b"signed with ed25519")
    signed = ed25519_key.sign(message, "other.example", "ed")
    tampered = signed.replace(b"Subject: signed with", b"Subject: forged with")
    assert tampered != signed
    with port25(a) as conn, pytest.raises(smtplib.SMTPDataError) as e:
        conn.sendmail(sender, [bob], tampered)
    assert e.value.smtp_code == 554


def test_passthrough_sender_and_recipient(fed):
    """Cleartext leaves from a passthrough sender, or to passthrough recipients
    only; any other recipient among them still gets the 523."""
    a, _, _ = fed
    sender_pw = "passthrough-sender-pw"
    a.imap(PASSTHROUGH_SENDER, sender_pw).logout()
    a.imap(PASSTHROUGH_RECIPIENT, "passthrough-recipient-pw").logout()
    alice, pw = account(a)
    bob, _ = account(a)
    message = mails.plain_message(PASSTHROUGH_SENDER, [bob], text="from the passthrough sender")
    assert submit_code(a, PASSTHROUGH_SENDER, sender_pw, [bob], message) == (250, "")
    assert b"from the passthrough sender" in wait_for_mail(a, bob, b"passthrough sender")
    message = mails.plain_message(alice, [PASSTHROUGH_RECIPIENT], text="to the passthrough rcpt")
    assert submit_code(a, alice, pw, [PASSTHROUGH_RECIPIENT], message) == (250, "")
    assert wait_for_mail(a, PASSTHROUGH_RECIPIENT, b"to the passthrough rcpt")
    both = [PASSTHROUGH_RECIPIENT, bob]
    code, text = submit_code(a, alice, pw, both, mails.plain_message(alice, both))
    assert code == 523 and "Encryption Needed" in text


def test_submission_header_section_too_large(fed):
    """A message that is all header (no empty line) is refused at submission too."""
    a, _, _ = fed
    alice, pw = account(a)
    bob, _ = account(a)
    message = f"From: <{alice}>\r\n".encode() + b"X: y\r\n" * 200_000
    code, text = submit_code(a, alice, pw, [bob], message)
    assert (code, text) == (552, f"5.3.4 Header section larger than {MAX_HEADER_SECTION} bytes")


def stored(relay: Relay, addr: str) -> list[bytes]:
    home = Path(relay.config.mailboxes_dir) / addr
    paths = [p for p in home.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")]
    return [stored_message(p) for p in paths]


def test_submission_to_a_disabled_account(fed):
    """Mail to a disabled account is dropped for that recipient only; 250 for the client."""
    a, _, _ = fed
    alice, pw = account(a)
    bob, _ = account(a)
    carol, _ = account(a)
    (Path(a.config.mailboxes_dir) / bob / "DISABLED").touch()
    message = mails.encrypted_message(alice, [bob, carol], subject="not for bob")
    assert submit_code(a, alice, pw, [bob, carol], message) == (250, "")
    marker = message.split(b"Message-ID: ")[1].split(b"\r\n")[0]
    wait_for_mail(a, carol, marker)  # one LMTP transaction would have brought bob's too
    # the same message again, bob alone: dropped as a whole, so nothing to deliver
    assert submit_code(a, alice, pw, [bob], message) == (250, "")
    # once this one is in for both, the queue holds nothing older for them
    control = mails.encrypted_message(alice, [bob, carol], subject="control")
    (Path(a.config.mailboxes_dir) / bob / "DISABLED").unlink()
    assert submit_code(a, alice, pw, [bob, carol], control) == (250, "")
    control_marker = control.split(b"Message-ID: ")[1].split(b"\r\n")[0]
    wait_for_mail(a, bob, control_marker)
    wait_for_mail(a, carol, control_marker)
    assert not [m for m in stored(a, bob) if marker in m]
    assert len([m for m in stored(a, carol) if marker in m]) == 1
