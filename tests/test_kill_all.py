"""Everything dies at once (issue 24, item 3): under load, every process of a
`make run` relay (Postfix, Dovecot, our daemons, all their children) gets SIGKILL
at a random moment, KILL_ROUNDS times in a row (5 here; `make bench`'s
bench_kill_all: 50), and the relay's supervisor starts them again, as systemd's
Restart=always does for the units.

Afterwards: every message that got a 250 is in its recipient's INBOX (more than
once only where Postfix's at-least-once delivery redelivers what LMTP had saved
when the kill came; counted), every account whose first login was answered OK
logs in with its password, no password file is empty or partial, no leftover of
an interrupted creation stops that address from being created later, and every
push token whose SETMETADATA was answered OK is still there.  Reading the
mailboxes back also shows that no folder is held up by a uidlist lock a killed
Dovecot process left (relay.imap's 30 s timeout; Dovecot alone waits 2 minutes:
chatmaild stale-locks).
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from chatmaild.common.accountlock import is_creation_leftover
from chatmaild.common.accounts import PASSWORD
from testing.mails import encrypted_message
from tests.fixtures.relay import full_relay

ROUNDS = int(os.environ.get("KILL_ROUNDS", "5"))
RECIPIENTS = 3
MAX_ACCOUNTS = 20 * ROUNDS  # accounts created under the load
READY_TIMEOUT = 120.0
DRAIN_TIMEOUT = 180.0
imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.I | re.M)
# what hash_password writes: the scheme, then crypt(3)'s $6$salt$hash
WHOLE_HASH = re.compile(r"\{SHA512-CRYPT\}\$6\$[^$]+\$[./0-9A-Za-z]{86}")


@pytest.fixture
def relay():
    # the load's rate and the test host's load must not be what refuses anything
    with full_relay({"max_user_send_per_minute": 60000, "max_user_send_burst_size": 60000,
                     "max_load_1m": 1000}, supervise=True) as r:  # fmt: skip
        yield r


class Load:
    """Mail submitted, accounts created and tokens set, all the time, by two
    threads that start over after each error (as the apps do)."""

    def __init__(self, relay, sender, recipients) -> None:
        self.relay, self.sender, self.recipients = relay, sender, recipients
        self.accepted: list[tuple[str, str]] = []  # (recipient, Message-ID) answered 250
        self.accounts: list[tuple[str, str]] = []  # first login answered OK
        self.attempted: list[tuple[str, str]] = []  # first logins, answered or not
        self.tokens: dict[str, str] = {}  # address -> token, SETMETADATA answered OK
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._create, daemon=True)]  # fmt: skip

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _send(self) -> None:
        addr, password = self.sender
        while not self.stop.is_set():
            try:
                with self.relay.smtp(addr, password) as smtp:
                    while not self.stop.is_set():
                        rcpt = random.choice(self.recipients)[0]
                        message = encrypted_message(addr, [rcpt], size=2000)
                        smtp.sendmail(addr, [rcpt], message)
                        msgid = MESSAGE_ID.search(message).group(1).decode()  # type: ignore[union-attr]
                        self.accepted.append((rcpt, msgid))
            except Exception:
                time.sleep(0.1)

    def _create(self) -> None:
        # bounded: each one is checked at the end, two logins apiece
        while not self.stop.is_set() and len(self.attempted) < MAX_ACCOUNTS:
            addr, password = self.relay.new_credentials()
            self.attempted.append((addr, password))
            try:
                conn = self.relay.imap(addr, password)
                self.accounts.append((addr, password))
                token = f"tok-{addr}"
                typ, _ = conn._simple_command(
                    "SETMETADATA", "INBOX", f'(/private/devicetoken "{token}")'
                )
                if typ == "OK":
                    self.tokens[addr] = token
                conn.logout()
            except Exception:
                time.sleep(0.1)
            time.sleep(0.05)


def wait_serving(relay, account) -> None:
    """Until a login and a submission connection both work again."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            relay.imap(*account).logout()
            with relay.smtp(*account):
                pass
            return
        except Exception as e:
            if time.monotonic() > deadline:
                logs = "\n".join(relay._log_of(name) for name in ("postfix", "dovecot"))
                pytest.fail(f"the relay did not come back ({e!r}); restarts so far: "
                            f"{relay.restarts}\n{logs}")  # fmt: skip
            time.sleep(0.2)


def kill_everything(relay) -> int:
    pids = relay.running_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def queue_records(relay) -> int:
    """Messages in Postfix's queue (postqueue -j, one JSON line each)."""
    out = subprocess.run(
        ["postqueue", "-c", str(relay.layout.postfix_config_dir), "-j"],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    return sum(1 for line in out.splitlines() if line.startswith("{"))


def drain(relay) -> None:
    """Flush the deferred mail (retried at once, not after Postfix's back-off) until
    the queue is empty."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    conf = str(relay.layout.postfix_config_dir)
    while True:
        subprocess.run(["postqueue", "-c", conf, "-f"], capture_output=True, timeout=30)
        if queue_records(relay) == 0:
            return
        assert time.monotonic() < deadline, f"{queue_records(relay)} messages stay queued"
        time.sleep(2)


def message_ids(relay, account) -> Counter[str]:
    conn = relay.imap(*account)
    try:
        conn.select("INBOX", readonly=True)
        typ, data = conn.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        found: Counter[str] = Counter()
        if typ != "OK":
            return found
        for item in data:
            if isinstance(item, tuple) and (m := MESSAGE_ID.search(item[1])):
                found[m.group(1).decode()] += 1
        return found
    finally:
        conn.logout()


def stale_locks(caplog) -> int:
    found = (re.search(r"removed (\d+) stale dovecot-uidlist", r.getMessage())
             for r in caplog.records)  # fmt: skip
    return sum(int(m.group(1)) for m in found if m)


@pytest.mark.relay
@pytest.mark.timeout(300 + ROUNDS * 60)  # the back-off reaches 30 s a round
def test_everything_killed_at_once_loses_nothing(relay, caplog):
    sender = relay.new_credentials()
    recipients = [relay.new_credentials() for _ in range(RECIPIENTS)]
    for account in (sender, *recipients):  # first logins: the accounts exist
        relay.imap(*account).logout()
    killed = 0
    back: list[float] = []  # seconds until it served again, per round
    with Load(relay, sender, recipients) as load:
        for _ in range(ROUNDS):
            time.sleep(random.uniform(0.5, 2.5))  # under load: a random moment
            killed += kill_everything(relay)
            t0 = time.monotonic()
            wait_serving(relay, sender)
            back.append(time.monotonic() - t0)
        time.sleep(1)
    wait_serving(relay, sender)
    t_drain = time.monotonic()
    drain(relay)
    t_check = time.monotonic()

    # -- mail: every 250 delivered; duplicates counted
    try:
        delivered = {addr: message_ids(relay, (addr, pw)) for addr, pw in recipients}
    except Exception:
        log = (relay.log_dir / "dovecot.log").read_text(errors="replace").splitlines()
        print("\n".join(x for x in log if "lmtp(" not in x)[-40:])
        raise
    took = time.monotonic() - t_check
    print(f"\nback in {', '.join(f'{t:.1f}' for t in back)} s; drained in"
          f" {t_check - t_drain:.1f} s, read back in {took:.1f} s")  # fmt: skip
    lost = [(rcpt, msgid) for rcpt, msgid in load.accepted if not delivered[rcpt][msgid]]
    duplicates = sum(n - 1 for ids in delivered.values() for n in ids.values() if n > 1)
    extra = sum(len(ids) for ids in delivered.values()) - len(load.accepted)
    print(f"\n{ROUNDS} rounds, {killed} processes killed: {len(load.accepted)} accepted,"
          f" {len(load.accepted) - len(lost)} delivered, {len(lost)} lost, {duplicates}"
          f" delivered twice, {extra} delivered whose 250 the kill took;"
          f" {len(load.accounts)} accounts, {len(load.tokens)} tokens; the supervisor"
          f" removed {stale_locks(caplog)} stale dovecot-uidlist.lock file(s)")  # fmt: skip
    for line in {r.getMessage() for r in caplog.records if "cannot restart" in r.getMessage()}:
        print(f"restart failed, tried again: {line[:300]}")
    assert len(load.accepted) > ROUNDS, "the load did not run"
    assert not lost, lost[:5]
    # at least once: a kill between Dovecot's save and Postfix's own record means the
    # message is delivered again, at most what LMTP had in flight at that moment
    assert duplicates <= ROUNDS * 20, duplicates

    # -- accounts: each answered one logs in; no password file empty or partial
    assert load.accounts, "no account was created under load"
    for account in load.accounts:
        relay.imap(*account).logout()
    domain_dir = Path(relay.config.mailboxes_dir)
    homes = [home for home in domain_dir.iterdir() if home.is_dir()]
    for home in homes:
        path = home / PASSWORD
        if path.exists():
            text = path.read_text()
            assert WHOLE_HASH.fullmatch(text.strip()), (home.name, text[:80])
    # a cut-off creation may leave files behind (chatmail-expire removes them), but
    # they block nothing: every address whose first login was cut off is created now,
    # with its own password
    cut_off = sum(1 for home in homes if not (home / PASSWORD).exists()
                  and any(is_creation_leftover(p.name) for p in home.iterdir()))  # fmt: skip
    print(f"{cut_off} creations cut off, leaving files behind")
    for account in load.attempted:
        relay.imap(*account).logout()

    # -- push tokens whose SETMETADATA got OK
    for addr, token in load.tokens.items():
        password = dict(load.accounts)[addr]
        conn = relay.imap(addr, password)
        try:
            typ, data = conn._simple_command("GETMETADATA", "INBOX", "(/private/devicetoken)")
            _, answer = conn._untagged_response(typ, data, "METADATA")
            assert typ == "OK" and token.encode() in repr(answer).encode(), (addr, answer)
        finally:
            conn.logout()
