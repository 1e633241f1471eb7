"""Outages of what delivery depends on lose nothing (issue 24, item 4).

Dovecot's LMTP gone (its socket, or the whole Dovecot killed and started again
by the supervisor, as systemd's Restart=always does) and Postfix's queue manager
stopped or killed: every message that got a 250 waits in Postfix's queue (a
deferral, 4.4.1, never a bounce) and arrives once the outage ends, exactly once,
without anyone flushing the queue.  How long that took is printed: with Postfix's
default retry times a 2 s LMTP outage held mail for 10 minutes (postfix/main.cf).
DNS and push outages: test_filtermail_handlers.py and test_notifier.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from chatmaild.relay.processes import process_tree, title
from testing.mails import encrypted_message
from tests.fixtures.relay import full_relay

pytestmark = [pytest.mark.relay, pytest.mark.timeout(600)]
MESSAGES = 5
# an outage's mail must arrive by Postfix's own retry within this (a few of its
# 10 s retry periods; with Postfix's defaults it took 10 minutes)
RECOVERY_TIMEOUT = 90.0
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.I | re.M)


@pytest.fixture(scope="module")
def relay():
    with full_relay({"max_user_send_per_minute": 6000, "max_user_send_burst_size": 6000,
                     "max_load_1m": 1000}, supervise=True) as r:  # fmt: skip
        yield r


def postfix_log(relay) -> str:
    return (relay.log_dir / "postfix.log").read_text(errors="replace")


def inbox_ids(relay, account) -> Counter[str]:
    conn = relay.imap(*account)
    try:
        conn.select("INBOX", readonly=True)
        typ, data = conn.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        found: Counter[str] = Counter()
        for item in data if typ == "OK" else []:
            if isinstance(item, tuple) and (m := MESSAGE_ID.search(item[1])):
                found[m.group(1).decode()] += 1
        return found
    finally:
        conn.logout()


def maildir_count(relay, addr: str) -> int:
    new = Path(relay.config.mailboxes_dir) / addr / "new"
    return len(os.listdir(new)) if new.is_dir() else 0


def submit(smtp, sender: str, rcpt: str, n: int = MESSAGES) -> list[str]:
    """n messages over an open session, each answered 250; their Message-IDs."""
    ids = []
    for i in range(n):
        msg = encrypted_message(sender, [rcpt], subject=f"outage {i}")
        ids.append(MESSAGE_ID.search(msg).group(1).decode())
        assert smtp.sendmail(sender, [rcpt], msg) == {}
    return ids


def wait_delivered(relay, addr: str, n: int, timeout: float = RECOVERY_TIMEOUT) -> float:
    """Seconds until ``addr``'s Maildir holds ``n`` new messages."""
    start = time.monotonic()
    while maildir_count(relay, addr) < n:
        assert time.monotonic() - start < timeout, (
            f"{maildir_count(relay, addr)} of {n} delivered after {timeout:.0f} s"
        )
        time.sleep(0.1)
    return time.monotonic() - start


def each_once(relay, rcpt, ids: list[str]) -> None:
    time.sleep(0.5)  # a duplicate would come at once
    found = inbox_ids(relay, rcpt)
    assert all(found[i] == 1 for i in ids), {i: found[i] for i in ids}


def pair(relay):
    sender, rcpt = relay.new_credentials(), relay.new_credentials()
    deadline = time.monotonic() + 60  # an earlier test's outage may still end
    for account in (sender, rcpt):
        while True:
            try:
                relay.imap(*account).logout()  # created
                break
            except Exception:
                assert time.monotonic() < deadline, "the relay does not serve"
                time.sleep(0.2)
    return sender, rcpt


def postfix_children(relay, name: str) -> list[int]:
    master = relay.pid_of("postfix")
    return [p for p in process_tree(master) if p != master and title(p).split()[:1] == [name]]


def test_lmtp_gone_defers_and_postfix_retries_by_itself(relay):
    """Dovecot's LMTP socket gone for a moment: deferred (not bounced), then
    delivered by Postfix's retry alone."""
    sender, rcpt = pair(relay)
    sock = Path(relay.ports["lmtp"])
    away = sock.with_name(sock.name + ".away")
    os.rename(sock, away)
    try:
        with relay.smtp(*sender) as smtp:
            ids = submit(smtp, sender[0], rcpt[0])
        deadline = time.monotonic() + 30
        while postfix_log(relay).count("dovecot-lmtp]: No such file") < 1:
            assert time.monotonic() < deadline, "no delivery was tried"
            time.sleep(0.1)
        time.sleep(2)  # the outage lasts
        assert maildir_count(relay, rcpt[0]) == 0
    finally:
        os.rename(away, sock)
    took = wait_delivered(relay, rcpt[0], MESSAGES)
    print(f"LMTP socket back: {MESSAGES} deferred messages delivered {took:.1f} s later")
    each_once(relay, rcpt, ids)
    log = postfix_log(relay)
    assert "status=bounced" not in log
    assert "dsn=4.4.1, status=deferred" in log


def test_dovecot_killed_mail_arrives_once_it_is_back(relay):
    """Dovecot dies while an authenticated session submits: the messages wait,
    and arrive once the supervisor has started Dovecot again."""
    sender, rcpt = pair(relay)
    restarts = relay.restarts.get("dovecot", 0)
    deferred_before = postfix_log(relay).count("status=deferred")
    with relay.smtp(*sender) as smtp:  # authenticated: submitting needs no Dovecot now
        killed = time.monotonic()
        for pid in process_tree(relay.pid_of("dovecot")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ids = submit(smtp, sender[0], rcpt[0])
    took = wait_delivered(relay, rcpt[0], MESSAGES)
    since_kill = time.monotonic() - killed
    deferred = postfix_log(relay).count("status=deferred") - deferred_before
    print(f"Dovecot killed: {MESSAGES} messages delivered {since_kill:.1f} s after the kill"
          f" ({deferred} deferrals, waited {took:.1f} s)")  # fmt: skip
    assert relay.restarts.get("dovecot", 0) > restarts
    each_once(relay, rcpt, ids)
    assert "status=bounced" not in postfix_log(relay)


def test_queue_manager_stopped_or_killed_mail_waits_and_goes_on(relay):
    """qmgr stopped (SIGSTOP): submissions are still answered 250 and nothing is
    delivered; once it runs again everything is.  Killed: Postfix's master starts
    a new one, which delivers what came meanwhile."""
    sender, rcpt = pair(relay)
    [qmgr] = postfix_children(relay, "qmgr")
    os.kill(qmgr, signal.SIGSTOP)
    try:
        with relay.smtp(*sender) as smtp:
            ids = submit(smtp, sender[0], rcpt[0])
        time.sleep(2)
        assert maildir_count(relay, rcpt[0]) == 0  # nothing moves without qmgr
    finally:
        os.kill(qmgr, signal.SIGCONT)
    took = wait_delivered(relay, rcpt[0], MESSAGES)
    print(f"qmgr stopped: delivered {took:.1f} s after it went on")

    os.kill(qmgr, signal.SIGKILL)
    with relay.smtp(*sender) as smtp:
        ids += submit(smtp, sender[0], rcpt[0])
    took = wait_delivered(relay, rcpt[0], 2 * MESSAGES)
    print(f"qmgr killed: delivered {took:.1f} s after the submissions")
    assert postfix_children(relay, "qmgr") not in ([], [qmgr])
    each_once(relay, rcpt, ids)
    assert "status=bounced" not in postfix_log(relay)


def test_a_restart_that_fails_is_tried_again(relay, caplog):
    """Postfix killed while its start cannot succeed (`postfix check` fails: no
    master.cf): the supervisor says so, keeps supervising, and starts Postfix
    once it can, as systemd does for a unit whose ExecStartPre= failed.  (A
    failed restart once ended the supervisor's thread: nothing came back.)"""
    sender, rcpt = pair(relay)
    restarts = relay.restarts.get("postfix", 0)
    master_cf = relay.layout.postfix_config_dir / "master.cf"
    aside = master_cf.with_name("master.cf.aside")
    master_cf.rename(aside)
    try:
        for pid in process_tree(relay.pid_of("postfix")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "cannot restart postfix" not in caplog.text:
            assert time.monotonic() < deadline, "the failed restart was not logged"
            time.sleep(0.1)
    finally:
        aside.rename(master_cf)
    assert "postfix check failed" in caplog.text
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while relay.restarts.get("postfix", 0) == restarts:
        assert time.monotonic() < deadline, "Postfix was not started again"
        time.sleep(0.1)
    with relay.smtp(*sender) as smtp:
        ids = submit(smtp, sender[0], rcpt[0])
    wait_delivered(relay, rcpt[0], MESSAGES)
    each_once(relay, rcpt, ids)


def test_a_killed_cleanups_temporary_file_does_not_stop_postfix(relay, caplog):
    """A cleanup killed while writing a queue file leaves it in incoming/ under
    its temporary name; before the next start `postfix check` (postsuper, then
    running as Postfix's mail_owner) warns about it, and a warning it could not
    write to the log file stopped Postfix from coming back at all (CI, the kill
    test's 4th round)."""
    sender, rcpt = pair(relay)
    restarts = relay.restarts.get("postfix", 0)
    incoming = relay.layout.postfix_queue_dir / "incoming"
    postfix = pwd.getpwnam("postfix")
    temp = incoming / f"{os.getpid() + 100000}.{os.getpid()}"  # inode.pid, as cleanup names it
    temp.write_bytes(b"")
    os.chown(temp, postfix.pw_uid, postfix.pw_gid)
    os.chmod(temp, 0o600)
    for pid in process_tree(relay.pid_of("postfix")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while relay.restarts.get("postfix", 0) == restarts:
        assert time.monotonic() < deadline, "Postfix did not come back:\n" + caplog.text[-3000:]
        time.sleep(0.1)
    assert "cannot restart postfix" not in caplog.text
    with relay.smtp(*sender) as smtp:
        ids = submit(smtp, sender[0], rcpt[0])
    wait_delivered(relay, rcpt[0], MESSAGES)
    each_once(relay, rcpt, ids)
