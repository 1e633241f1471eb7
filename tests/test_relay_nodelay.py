"""The Dovecot no-delay shim: applied to stock Dovecot 2.3 and 2.4.0-2.4.4, harmless otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatmaild.relay.nodelay import applies, dovecot_version
from testing.imapidle import IdleClient

pytestmark = pytest.mark.relay


def _imap_pids_with(relay, needle: str) -> list[int]:
    found = []
    for pid in relay.running_pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        if cmd.split(b"\0")[0].endswith(b"/imap") and needle in maps:
            found.append(pid)
    return found


def deliver_and_wait_idle(relay) -> IdleClient:
    addr, pw = relay.new_credentials()
    client = IdleClient(relay.host, relay.ports["imaps"], addr, pw)
    client.idle()
    with relay.smtp(addr, pw) as smtp:
        smtp.sendmail(addr, [addr], f"From: {addr}\r\nTo: {addr}\r\n\r\nping\r\n")
    assert client.wait_exists(timeout=20) == 1
    return client


def test_version_gate():
    # the versions whose mailbox-watch.c and timeout_add_short() the shim was checked against
    for version in ("2.3.0", "2.3.19.1", "2.4.0", "2.4.1-4", "2.4.4"):
        assert applies(version), version
    for version in ("2.2.36", "2.4.5", "2.5.0", "3.0.0", "", None):
        assert not applies(version), version


def test_idle_notification_with_shim(relay_factory):
    assert applies(dovecot_version()), "this machine's Dovecot should be Debian's 2.3 or 2.4.1"
    relay = relay_factory(components=["postfix", "dovecot", "doveauth"], nodelay=True)
    assert relay.layout.nodelay_so is not None
    client = deliver_and_wait_idle(relay)
    try:
        # the idling imap process really carries the shim
        assert _imap_pids_with(relay, "dovecot_nodelay.so")
    finally:
        client.done()
        client.close()


def test_idle_notification_without_shim(relay_factory):
    relay = relay_factory(components=["postfix", "dovecot", "doveauth"], nodelay=False)
    assert relay.layout.nodelay_so is None
    client = deliver_and_wait_idle(relay)
    try:
        assert not _imap_pids_with(relay, "dovecot_nodelay.so")
    finally:
        client.done()
        client.close()
