"""The relay stack against real Postfix and Dovecot (no filtermail)."""

from __future__ import annotations

import email
import json
import socket
import time
from pathlib import Path

import pytest

from chatmaild.relay import Relay, RelayError, TemplateError, render_text

pytestmark = pytest.mark.relay


def wait_for_messages(relay: Relay, addr: str, password: str, count: int = 1, timeout=20):
    """Messages in INBOX, polling until ``count`` arrived (delivery is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = relay.imap(addr, password)
        try:
            conn.select("INBOX")
            _, data = conn.search(None, "ALL")
            nums = data[0].split()
            if len(nums) >= count or time.monotonic() > deadline:
                msgs = []
                for num in nums:
                    _, fetched = conn.fetch(num, "(RFC822)")
                    msgs.append(email.message_from_bytes(fetched[0][1]))
                return msgs
        finally:
            conn.logout()
        time.sleep(0.1)


def test_render_rejects_unknown_variable():
    assert render_text("a = {{ x }} $y %u", {"x": 1}) == "a = 1 $y %u"
    with pytest.raises(TemplateError, match="nosuch"):
        render_text("a = {{ nosuch }}", {"x": 1})


def test_imap_login_creates_account(relay):
    addr, password = relay.new_credentials()
    conn = relay.imap(addr, password)
    _, caps = conn.capability()
    conn.logout()
    assert b"XDELTAPUSH" in caps[0] and b"XCHATMAIL" in caps[0]
    home = Path(relay.config.mailboxes_dir) / addr
    assert (home / "password").exists()
    # wrong password for an existing account is refused
    with pytest.raises(Exception, match="AUTHENTICATIONFAILED|Authentication failed"):
        relay.imap(addr, password + "x")


def test_submit_and_deliver_with_header_cleanup(relay):
    sender, spw = relay.new_credentials()
    rcpt, rpw = relay.new_credentials()
    relay.imap(rcpt, rpw).logout()  # create the recipient
    msg = (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: secret subject\r\n"
        "User-Agent: Foomail 1.0\r\nX-Mailer: bar\r\n\r\nhello\r\n"
    )
    with relay.smtp(sender, spw) as smtp:
        smtp.sendmail(sender, [rcpt], msg)
    [got] = wait_for_messages(relay, rcpt, rpw)
    assert got["Subject"] == "[...]"
    assert got.get_payload().strip() == "hello"
    for header in ("Received", "User-Agent", "X-Mailer", "X-Originating-IP"):
        assert header not in got, header
    assert "127.0.0.1" not in got.as_string()


def test_sender_must_match_login(relay):
    import smtplib

    a, apw = relay.new_credentials()
    b, _ = relay.new_credentials()
    with relay.smtp(a, apw) as smtp, pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
        smtp.sendmail(b, [a], f"From: {b}\r\nTo: {a}\r\n\r\nx\r\n")
    assert exc.value.recipients[a][0] == 553


def test_nothing_leaves_the_box(relay):
    import smtplib

    a, apw = relay.new_credentials()
    # accepted for delivery, then refused by the default transport: the bounce comes back
    with relay.smtp(a, apw) as smtp:
        smtp.sendmail(a, ["someone@outside.example"], f"From: {a}\r\nTo: x\r\n\r\nx\r\n")
    bounces = wait_for_messages(relay, a, apw)
    assert bounces and "outside.example" in bounces[0].as_string()
    assert "delivery outside this local relay is disabled" in bounces[0].as_string()
    # port 25 does not relay for strangers
    with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=10) as smtp:
        smtp.starttls(context=__import__("chatmaild.relay").relay.client_tls_context())
        smtp.ehlo("peer.example")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("x@peer.example", ["y@outside.example"], "Subject: x\r\n\r\nx\r\n")


def test_relay_json_and_clean_stop(relay_factory):
    relay = relay_factory(components=["postfix", "dovecot", "doveauth"])
    facts = json.loads((relay.state_dir / "relay.json").read_text())
    assert facts["mail_domain"] == relay.mail_domain
    assert facts["ports"]["imaps"] == relay.ports["imaps"]
    pids = relay.running_pids()
    # both masters and their children plus doveauth; how many children Postfix
    # and Dovecot keep idle varies, so check membership rather than a count
    masters = {relay._dovecot_pid(), relay._postfix_pid()}
    assert None not in masters and masters < pids
    relay.stop()
    assert not any(Path(f"/proc/{p}").exists() and _not_zombie(p) for p in pids)
    for name in ("smtp", "submissions", "imaps", "imap"):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", relay.ports[name])) != 0, name
    assert not (relay.state_dir / "relay.json").exists()


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class FailsRightAfterDovecot(Relay):
    """A start that fails the moment Dovecot has been launched (before its pid file exists)."""

    def spawn(self, name: str):
        proc = super().spawn(name)
        if name == "dovecot":
            self.dovecot_launched = proc.pid
            raise RelayError("simulated failure right after starting Dovecot")
        return proc


def test_a_failed_start_leaves_no_server_running():
    from tests.sandbox import leftover_processes, world_readable_tempdir

    state = world_readable_tempdir("failing-")
    relay = FailsRightAfterDovecot(state, None, ("postfix", "dovecot", "doveauth"))
    with pytest.raises(RelayError, match="simulated"):
        relay.start()
    assert relay.dovecot_launched
    assert not Path(f"/proc/{relay.dovecot_launched}").exists()
    assert leftover_processes(state) == []


def test_leftover_check_finds_a_process_of_the_session(tmp_path):
    """The end-of-run check sees a server started below a test directory and still running."""
    import subprocess
    import sys

    from tests.sandbox import leftover_processes, world_readable_tempdir

    state = world_readable_tempdir("leak-")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(state / "etc/dovecot.conf")]
    )
    try:
        # Popen (vfork) may return before exec has set up the new command line, which
        # then reads empty for a moment (failed 2 runs of the Debian 13 container)
        deadline = time.monotonic() + 10
        while not [line for line in leftover_processes(state) if f"pid {proc.pid}:" in line]:
            assert time.monotonic() < deadline, "a running process below the state dir not found"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert leftover_processes(state) == []


def test_ports_of_a_relay_not_yet_started_are_held():
    """Relays are made before they start (two peered relays, say): a port picked for
    one must not be picked for the next meanwhile.  Postfix listens with SO_REUSEPORT,
    so two relays on one port would both start and share its connections."""
    from tests.sandbox import world_readable_tempdir

    state = world_readable_tempdir("held-")
    relay = Relay(state / "a", None, ("postfix", "dovecot", "doveauth"))
    ports = [int(relay.ports[name]) for name in ("smtp", "submission", "imaps")]
    try:
        for port in ports:
            with socket.socket() as s, pytest.raises(OSError, match="in use"):
                s.bind(("127.0.0.1", port))
        relay.start()  # the servers bind the held ports all the same
        relay.imap(*relay.new_credentials()).logout()
    finally:
        relay.stop()
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # released by stop()


def test_a_port_someone_else_listens_on_too_fails_the_start():
    """A second listener sharing the SMTP port through SO_REUSEPORT (as another
    Postfix would) is found at start, not left to take half the mail."""
    from tests.sandbox import leftover_processes, world_readable_tempdir

    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    state = world_readable_tempdir("shared-")
    try:
        relay = Relay(state, {"smtp_port": port}, ("postfix", "dovecot"))
        with pytest.raises(RelayError, match=f"smtp {port} \\(2 listeners\\)"):
            relay.start()
    finally:
        other.close()
    assert leftover_processes(state) == []
