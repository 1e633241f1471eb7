"""Account creation and authentication through the real Dovecot of this machine.

Dovecot 2.3 asks doveauth over the dict protocol (passdb/userdb ``driver =
dict``), Dovecot 2.4 through the Lua passdb/userdb over doveauth's HTTP socket
(dovecot/auth.lua); the same tests hold for both.
"""

from __future__ import annotations

import imaplib
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from chatmaild.common.accounts import AccountStore, verify_password
from chatmaild.relay import Relay
from testing.maildirs import stored_message
from tests.fixtures.relay import base_components
from tests.sandbox import world_readable_tempdir

pytestmark = [pytest.mark.dovecot]

MESSAGE = b"From: a@b\r\nSubject: hello\r\nMessage-ID: <t1@x>\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def auth_relay() -> Iterator[Relay]:
    state = world_readable_tempdir("auth-")
    relay = Relay(state, None, base_components())
    try:
        relay.start()
        yield relay
    finally:
        relay.stop()
        shutil.rmtree(state, ignore_errors=True)


def store(relay: Relay) -> AccountStore:
    return AccountStore(relay.config)


def doveadm(relay: Relay, *args: str) -> subprocess.CompletedProcess:
    conf = relay.layout.dovecot_config_dir / "dovecot.conf"
    return subprocess.run(
        ["doveadm", "-c", str(conf), *args], capture_output=True, text=True, timeout=60
    )


def login_fails(relay: Relay, addr: str, password: str) -> bool:
    try:
        relay.imap(addr, password).logout()
    except imaplib.IMAP4.error as e:
        assert "AUTHENTICATIONFAILED" in str(e) or "Authentication failed" in str(e), e
        return True
    return False


def test_first_login_creates_account_and_lands_in_maildir(auth_relay):
    addr, password = auth_relay.new_credentials()
    conn = auth_relay.imap(addr, password)
    try:
        assert conn.select("INBOX")[0] == "OK"
        assert conn.append("INBOX", None, None, MESSAGE)[0] == "OK"
    finally:
        conn.logout()
    account = store(auth_relay).account(addr)
    assert verify_password(password, account.password_hash())
    assert account.enforces_e2ee_incoming
    stored = list((account.home / "new").iterdir()) + list((account.home / "cur").iterdir())
    assert len(stored) == 1
    assert stored[0].read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zlib_save = zstd
    data = stored_message(stored[0])
    assert b"Subject: hello" in data
    vmail_uid = account.home.stat().st_uid
    assert stored[0].stat().st_uid == vmail_uid == account.password_path.stat().st_uid
    # logging in again reaches the same mailbox
    conn = auth_relay.imap(addr, password)
    try:
        assert conn.select("INBOX")[1] == [b"1"]
    finally:
        conn.logout()


def test_uppercase_login_is_the_same_account(auth_relay):
    addr, password = auth_relay.new_credentials()
    auth_relay.imap(addr, password).logout()
    auth_relay.imap(addr.upper(), password).logout()
    assert list(store(auth_relay).iter_addresses()).count(addr) == 1


def test_wrong_password_fails(auth_relay):
    addr, password = auth_relay.new_credentials()
    auth_relay.imap(addr, password).logout()
    before = store(auth_relay).account(addr).password_hash()
    assert login_fails(auth_relay, addr, password + "x")
    assert store(auth_relay).account(addr).password_hash() == before


def test_logins_verified_by_doveauth_pass_and_wrong_ones_still_fail(auth_relay):
    """After the first login doveauth answers the verified password in the PLAIN
    scheme: Dovecot lets the right one in (again and again, also with quotes and
    a backslash in it), a longer or a shorter one never, nor the
    stored hash given as the password, nor the old password of an account made
    again."""
    addr, password = auth_relay.new_credentials()
    password += "\"'\\ x"
    auth_relay.imap(addr, password).logout()  # created
    for _ in range(3):  # verified, then remembered
        auth_relay.imap(addr, password).logout()
    stored = store(auth_relay).account(addr).password_hash()
    for wrong in (password + "x", password[:-1], stored, "{PLAIN}" + password):
        assert login_fails(auth_relay, addr, wrong), wrong
    auth_relay.imap(addr, password).logout()
    assert store(auth_relay).delete(addr)
    auth_relay.imap(addr, password + "-new").logout()  # created again
    assert login_fails(auth_relay, addr, password)
    auth_relay.imap(addr, password + "-new").logout()


def test_too_short_password_is_refused(auth_relay):
    addr, _ = auth_relay.new_credentials()
    assert login_fails(auth_relay, addr, "short")
    assert store(auth_relay).lookup(addr) is None


@pytest.mark.parametrize("localpart", ["abc..defg", "abcdefgh", "abcdefghij", ".abcdefgh"])
def test_bad_localpart_is_refused(auth_relay, localpart):
    addr = f"{localpart}@{auth_relay.mail_domain}"
    assert login_fails(auth_relay, addr, "long-enough-password")
    assert addr not in list(store(auth_relay).iter_addresses())


def test_nocreate_blocks_creation(auth_relay):
    existing, existing_pw = auth_relay.new_credentials()
    auth_relay.imap(existing, existing_pw).logout()
    accounts = store(auth_relay)
    accounts.set_registration_blocked(True)
    try:
        addr, password = auth_relay.new_credentials()
        assert login_fails(auth_relay, addr, password)
        assert accounts.lookup(addr) is None
        auth_relay.imap(existing, existing_pw).logout()  # existing accounts keep working
    finally:
        accounts.set_registration_blocked(False)
    auth_relay.imap(addr, password).logout()
    assert accounts.lookup(addr) is not None


def test_doveadm_auth_test(auth_relay):
    addr, password = auth_relay.new_credentials()
    # a password may start with "-" (token_urlsafe): "--" ends doveadm's options
    password = "-" + password
    ok = doveadm(auth_relay, "auth", "test", "--", addr, password)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "auth succeeded" in ok.stdout
    assert store(auth_relay).lookup(addr) is not None  # created by the passdb lookup
    bad = doveadm(auth_relay, "auth", "test", "--", addr, password + "x")
    assert bad.returncode != 0
    assert "auth failed" in bad.stdout


def test_doveadm_user_lookup(auth_relay):
    addr, password = auth_relay.new_credentials()
    auth_relay.imap(addr, password).logout()
    found = doveadm(auth_relay, "user", addr)
    assert found.returncode == 0, found.stdout + found.stderr
    assert str(store(auth_relay).account(addr).home) in found.stdout
    missing = doveadm(auth_relay, "user", auth_relay.new_credentials()[0])
    assert missing.returncode != 0


def test_listing_all_accounts(auth_relay):
    created = []
    for _ in range(3):
        addr, password = auth_relay.new_credentials()
        auth_relay.imap(addr, password).logout()
        created.append(addr)
    expected = sorted(store(auth_relay).iter_addresses())
    assert set(created) <= set(expected)
    users = doveadm(auth_relay, "user", "*")  # userdb iteration
    assert users.returncode == 0, users.stderr
    assert sorted(users.stdout.split()) == expected
    boxes = doveadm(auth_relay, "-f", "tab", "mailbox", "list", "-A")
    assert boxes.returncode == 0, boxes.stderr
    assert set(created) <= {line.split("\t")[0] for line in boxes.stdout.splitlines()}


def test_200_parallel_first_logins_make_one_account(auth_relay):
    addr, _ = auth_relay.new_credentials()
    barrier = threading.Barrier(200)
    outcomes: list[str] = []
    lock = threading.Lock()

    def login(i: int) -> None:
        password = f"password-{i:03d}-long"
        try:
            barrier.wait()
            auth_relay.imap(addr, password).logout()
            outcome = password
        except imaplib.IMAP4.error:
            outcome = "refused"
        except Exception as e:  # connection trouble would be a real failure
            outcome = f"error: {e!r}"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=login, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes if o.startswith("error")]
    assert errors == []
    winners = [o for o in outcomes if o != "refused"]
    # one password became the account's; every other first login was refused
    assert len(winners) == 1, winners
    account = store(auth_relay).account(addr)
    assert verify_password(winners[0], account.password_hash())
    assert list(store(auth_relay).iter_addresses()).count(addr) == 1
    leftovers = [p.name for p in account.home.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_doveauth_down_is_a_temporary_failure(relay_factory):
    relay = relay_factory(components=["postfix", "dovecot", "doveauth"])
    addr, password = relay.new_credentials()
    relay.imap(addr, password).logout()
    doveauth = relay.proc_of("doveauth")
    doveauth.send_signal(signal.SIGTERM)
    assert doveauth.wait(30) == 0
    for who in (addr, relay.new_credentials()[0]):  # an existing and a new account
        with pytest.raises(imaplib.IMAP4.error) as refused:
            relay.imap(who, password).logout()
        # the client is told to retry later, not that its password is wrong
        assert "UNAVAILABLE" in str(refused.value), refused.value
        assert "AUTHENTICATIONFAILED" not in str(refused.value)
