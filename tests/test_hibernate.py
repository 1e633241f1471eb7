"""IMAP hibernation (issue 27, first step): an IDLE client costs no imap process.

After ``imap_hibernate_timeout`` in IDLE, Dovecot hands the client's connection
to imap-hibernate and its ``imap`` process ends; new mail wakes it (a new
``imap`` process takes the connection back) and reaches it as EXISTS, and the
client stays in IDLE across it, again and again.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from testing.imapidle import IdleClient
from testing.mails import encrypted_message

pytestmark = [pytest.mark.relay, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def relay():
    from tests.fixtures.relay import RelayPool, base_components

    pool = RelayPool()
    try:
        # with the web process: port 993's IMAP front, as on an installed relay
        yield pool({"imap_hibernate_timeout": 1, "max_user_send_per_minute": 600},
                   (*base_components(), "newemail"))  # fmt: skip
    finally:
        pool.close()


def imap_pids(relay) -> list[int]:
    """This relay's Dovecot ``imap`` processes (not imap-login, not imap-hibernate)."""
    title = re.compile(rf"{re.escape(relay.layout.dovecot_instance)}/imap(\s.*)?$")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").strip()
        except OSError:
            continue
        if title.search(cmdline.decode(errors="replace")):
            found.append(int(pid))
    return found


def imap_processes(relay) -> int:
    return len(imap_pids(relay))


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_idle_client_hibernates_and_gets_new_mail(relay):
    sender, spw = relay.new_credentials()
    rcpt, rpw = relay.new_credentials()
    relay.imap(sender, spw).logout()
    client = IdleClient(relay.host, int(relay.ports["imaps"]), rcpt, rpw)
    try:
        assert imap_processes(relay) == 1  # awake: its own process
        with relay.smtp(sender, spw) as smtp:
            for round_ in range(3):
                client.idle()
                wait_until(lambda: imap_processes(relay) == 0, 20,
                           "no hibernation: the imap process did not end")  # fmt: skip
                smtp.sendmail(sender, [rcpt], encrypted_message(sender, [rcpt]))
                assert client.wait_exists(timeout=10) == round_ + 1
                # woken: a process holds the connection again, and IDLE goes on
                assert imap_processes(relay) == 1
                client.done()
        # the woken process ends cleanly at logout, nothing is left awake
        client.close()
        wait_until(lambda: imap_processes(relay) == 0, 10, "imap process left after logout")
    finally:
        client.close()


def test_hibernated_client_survives_imap_processes_being_killed(relay):
    sleeper, spw = relay.new_credentials()
    client = IdleClient(relay.host, int(relay.ports["imaps"]), sleeper, spw)
    awake_addr, apw = relay.new_credentials()
    try:
        client.idle()
        wait_until(lambda: imap_processes(relay) == 0, 20, "no hibernation")
        awake = IdleClient(relay.host, int(relay.ports["imaps"]), awake_addr, apw)
        pids = imap_pids(relay)
        assert len(pids) == 1
        for pid in pids:  # a crash of every imap process there is
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: imap_processes(relay) == 0, 10, "killed imap process still there")
        awake.sock.close()
        with relay.smtp(awake_addr, apw) as smtp:  # logs in anew: the account is fine
            smtp.sendmail(awake_addr, [sleeper], encrypted_message(awake_addr, [sleeper]))
        assert client.wait_exists(timeout=10) == 1  # the hibernated client never noticed
        client.done()
    finally:
        client.close()
