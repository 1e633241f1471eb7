"""Push tokens, notifications and last-login against real Dovecot 2.3 (IMAP, LMTP, Lua hook)."""

from __future__ import annotations

import imaplib
import os
import re
import signal
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from chatmaild.relay import Relay
from tests.fixtures.metadata import wait_until

pytestmark = [pytest.mark.dovecot, pytest.mark.postfix]

COMPONENTS = ("postfix", "dovecot", "doveauth", "lastlogin", "metadata")
DAY = 86400

# imaplib knows no RFC 5464 commands
imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))


@pytest.fixture
def push_relay(relay_factory, http_sink):
    return relay_factory(
        {
            "notification_url": http_sink.url,
            "notification_retry_delay": "0.05",
            "iroh_relay": "https://iroh.chat.example",
        },
        COMPONENTS,
    )


def set_token(conn: imaplib.IMAP4, token: str) -> None:
    typ, data = conn._simple_command("SETMETADATA", "INBOX", f'(/private/devicetoken "{token}")')
    assert typ == "OK", data


def get_metadata(conn: imaplib.IMAP4, mailbox: str, entry: str) -> str | None:
    typ, data = conn._simple_command("GETMETADATA", mailbox, f"({entry})")
    assert typ == "OK", data
    _, responses = conn._untagged_response(typ, data, "METADATA")
    for item in responses:
        # (b'INBOX (/private/devicetoken {9}', b'tok1 tok2') or b'"" (/shared/... "v")'
        if isinstance(item, tuple):
            return item[1].decode()
        if item is None or item == b")":
            continue
        m = re.search(rb'\(\S+ (?:"(.*)"|NIL)\)$', item)
        if m:
            return m.group(1).decode() if m.group(1) is not None else None
    return None


def deliver(relay: Relay, sender: str, rcpt: str) -> None:
    """One message into ``rcpt``'s INBOX through Dovecot's LMTP (as Postfix would)."""
    msg = f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: [...]\r\n\r\nencrypted\r\n"
    with smtplib.LMTP(str(relay.ports["lmtp"])) as lmtp:
        assert lmtp.sendmail(sender, [rcpt], msg) == {}


def queue_files(relay: Relay) -> list[str]:
    return os.listdir(relay.config.notification_dir)


def test_two_devices_round_trip_over_imap(push_relay):
    addr, password = push_relay.new_credentials()
    conn = push_relay.imap(addr, password)
    try:
        assert get_metadata(conn, "INBOX", "/private/devicetoken") in (None, "")
        set_token(conn, "phone-token")
        set_token(conn, "desktop-token")
        set_token(conn, "phone-token")  # refresh, not a duplicate
        assert get_metadata(conn, "INBOX", "/private/devicetoken") == "phone-token desktop-token"
        # server metadata the Delta Chat core reads
        assert get_metadata(conn, '""', "/shared/vendor/deltachat/maxsmtprecipients") == "1000"
        irohrelay = get_metadata(conn, '""', "/shared/vendor/deltachat/irohrelay")
        assert irohrelay == "https://iroh.chat.example"
        assert get_metadata(conn, '""', "/shared/vendor/deltachat/turn") is None
        assert get_metadata(conn, "INBOX", "/private/other") is None
    finally:
        conn.logout()


def test_lmtp_delivery_pushes_every_token_with_retry_and_gone(push_relay, http_sink):
    addr, password = push_relay.new_credentials()
    conn = push_relay.imap(addr, password)
    http_sink.script("flaky", [500])
    http_sink.set_status("stale", 410)
    set_token(conn, "flaky")
    set_token(conn, "stale")
    set_token(conn, "fine")

    deliver(push_relay, "sender@elsewhere.example", addr)
    assert http_sink.wait_for(
        lambda s: s.count("flaky", 200) == 1 and s.count("fine", 200) == 1, 20
    ), http_sink.posts
    assert http_sink.count("flaky", 500) == 1  # retried after the 500
    assert http_sink.count("stale", 410) == 1
    assert wait_until(lambda: get_metadata(conn, "INBOX", "/private/devicetoken") == "flaky fine")
    assert wait_until(lambda: queue_files(push_relay) == [])

    # a copy of the account's own message wakes nobody; the next real one does
    http_sink.clear()
    deliver(push_relay, addr, addr)
    time.sleep(0.5)  # the hook ran inside the LMTP transaction; give a wrong POST time to show
    assert http_sink.tokens() == [] and queue_files(push_relay) == []
    deliver(push_relay, "sender@elsewhere.example", addr)
    assert http_sink.wait_for(lambda s: sorted(s.tokens()) == ["fine", "flaky"], 20)
    conn.logout()


def respawn_metadata(relay: Relay) -> subprocess.Popen:
    """Start the dict process (metadata's) again as the relay does (as vmail)."""
    return relay.spawn("dict")


def test_sigkill_with_pending_notifications(relay_factory, http_sink):
    relay = relay_factory(
        {"notification_url": http_sink.url, "notification_retry_delay": "30"}, COMPONENTS
    )
    addr, password = relay.new_credentials()
    conn = relay.imap(addr, password)
    set_token(conn, "dev-a")
    set_token(conn, "dev-b")
    conn.logout()

    http_sink.set_default(500)
    for _ in range(3):
        deliver(relay, "sender@elsewhere.example", addr)
    # every delivery is on disk as soon as LMTP has answered: per device one or two
    # files (a newer notification replaces the one waiting beside the request in flight)
    tokens = [Path(relay.config.notification_dir, n).read_text().split("\n")[2]
              for n in queue_files(relay)]  # fmt: skip
    assert sorted(set(tokens)) == ["dev-a", "dev-b"] and len(tokens) <= 4, tokens
    assert http_sink.wait_for(lambda s: len(s.tokens(500)) >= 2, 20)

    left = sorted(queue_files(relay))
    proc = relay.proc_of("metadata")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    assert sorted(queue_files(relay)) == left

    http_sink.clear()
    http_sink.set_default(200)
    respawn_metadata(relay)
    assert wait_until(lambda: queue_files(relay) == [], 30), queue_files(relay)
    delivered = http_sink.tokens(200)
    # at least once per device, never more often than notifications were queued for it
    assert 1 <= delivered.count("dev-a") <= 3
    assert 1 <= delivered.count("dev-b") <= 3
    assert set(delivered) == {"dev-a", "dev-b"}


def password_mtime(relay: Relay, addr: str) -> int:
    return int(os.stat(os.path.join(relay.config.mailboxes_dir, addr, "password")).st_mtime)


def test_only_successful_login_moves_last_login(push_relay):
    addr, password = push_relay.new_credentials()
    push_relay.imap(addr, password).logout()  # creates the account
    # that login's own last-login write is asynchronous: let it land before back-dating
    today = int(time.time()) // DAY * DAY
    assert wait_until(lambda: password_mtime(push_relay, addr) == today)
    old_day = (int(time.time()) // DAY - 10) * DAY
    pw_file = os.path.join(push_relay.config.mailboxes_dir, addr, "password")
    os.utime(pw_file, (old_day, old_day))

    with pytest.raises(imaplib.IMAP4.error):
        push_relay.imap(addr, password + "-wrong")
    time.sleep(0.5)  # the plugin would have written by now, it never runs
    assert password_mtime(push_relay, addr) == old_day

    push_relay.imap(addr, password).logout()
    assert wait_until(lambda: password_mtime(push_relay, addr) == today)


def test_delivery_succeeds_while_metadata_is_unreachable(push_relay, http_sink):
    addr, password = push_relay.new_credentials()
    conn = push_relay.imap(addr, password)
    set_token(conn, "tok")
    # metadata shares its process with doveauth, which LMTP needs; its socket
    # going away is what Dovecot sees when the metadata role is down
    sock = Path(push_relay.config.metadata_socket)
    hidden = sock.with_name("metadata.hidden")
    sock.rename(hidden)
    try:
        deliver(push_relay, "sender@elsewhere.example", addr)  # asserts LMTP accepted it
    finally:
        hidden.rename(sock)
    typ, data = conn.select("INBOX")
    assert typ == "OK" and data == [b"1"]
    log = (push_relay.log_dir / "dovecot.log").read_text(errors="replace")
    assert "chatmail push hook: cannot set /private/messagenew" in log
    conn.logout()
