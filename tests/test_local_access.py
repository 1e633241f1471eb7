"""Who on this machine can reach a relay's sockets and account data (real relay).

Every local user other than vmail and root must get EACCES from our dict
sockets (doveauth: account list, password hashes, account creation; metadata;
lastlogin), from the Dovecot sockets that answer about or deliver to any
account, and from the account directories; meanwhile IMAP login with account
creation, METADATA, last login and delivery keep working through real
Dovecot.  See SECURITY.md for the intended client of every socket.
"""

from __future__ import annotations

import imaplib
import json
import os
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from chatmaild.relay import Relay
from testing.access import probe_as
from testing.dictclient import DictClient
from tests.fixtures.metadata import wait_until

pytestmark = [pytest.mark.dovecot, pytest.mark.postfix]

imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))

DAY = 86400


def dict_sockets(relay: Relay) -> dict[str, str]:
    cfg = relay.config
    return {
        "doveauth": cfg.doveauth_socket,
        "metadata": cfg.metadata_socket,
        "lastlogin": cfg.lastlogin_socket,
    }


def dovecot_sockets(relay: Relay) -> dict[str, Path]:
    """Dovecot sockets that would answer about (or deliver to) any account."""
    base = relay.layout.dovecot_base_dir
    spool = relay.layout.postfix_queue_dir / "private"
    return {
        "auth-userdb": base / "auth-userdb",
        "indexer": base / "indexer",
        "postfix lmtp": spool / "dovecot-lmtp",
        "postfix sasl": spool / "auth",
    }


@pytest.fixture(scope="module")
def account(relay) -> tuple[str, str]:
    addr, password = relay.new_credentials()
    relay.imap(addr, password).logout()  # created by Dovecot through doveauth
    return addr, password


@pytest.mark.parametrize("user,group", [("nobody", "nogroup"), ("dovecot", "dovecot")])
def test_other_users_cannot_connect_to_dict_sockets(relay, user, group):
    for name, path in dict_sockets(relay).items():
        assert os.path.exists(path), name
        assert probe_as(user, group, "connect", path) == "EACCES", name


def test_vmail_reaches_dict_sockets(relay):
    # the probe itself works: the user Dovecot's processes run as gets through
    user = relay.config.vmail_user
    for name, path in dict_sockets(relay).items():
        assert probe_as(user, user, "connect", path) == "OK", name


def test_other_users_cannot_reach_dovecot_account_sockets(relay):
    for name, path in dovecot_sockets(relay).items():
        assert probe_as("nobody", "nogroup", "connect", path) == "EACCES", name
    # Dovecot's default LMTP listener (mode 0666) is not created at all
    assert not (relay.layout.dovecot_base_dir / "lmtp").exists()


def test_other_users_cannot_list_or_read_accounts(relay, account):
    addr, _ = account
    mailboxes = Path(relay.config.mailboxes_dir)
    assert probe_as("nobody", "nogroup", "list", mailboxes) == "EACCES"
    assert probe_as("nobody", "nogroup", "read", mailboxes / addr / "password") == "EACCES"
    assert probe_as("dovecot", "dovecot", "list", mailboxes) == "EACCES"
    # make run's logs name every created account ("Created address: ...")
    assert probe_as("nobody", "nogroup", "list", relay.log_dir) == "EACCES"
    for name in ("postfix.log", "dovecot.log", "dict.log"):
        assert probe_as("nobody", "nogroup", "read", relay.log_dir / name) == "EACCES", name
    # Postfix's mail_owner enters the directory to write its own log, and reads no other
    assert probe_as("postfix", "postfix", "list", relay.log_dir) == "EACCES"
    others = sorted(set(os.listdir(relay.log_dir)) - {"postfix.log"})
    assert {"dict.log", "dovecot.log", "postfix-start.out"} <= set(others), others
    for name in others:
        assert probe_as("postfix", "postfix", "read", relay.log_dir / name) == "EACCES", name


def test_account_creation_metadata_and_last_login_still_work(relay):
    addr, password = relay.new_credentials()
    conn = relay.imap(addr, password)  # creates the account: auth-worker -> doveauth
    try:
        typ, data = conn._simple_command("SETMETADATA", "INBOX", '(/private/devicetoken "t1")')
        assert typ == "OK", data
        typ, data = conn._simple_command("GETMETADATA", "INBOX", "(/private/devicetoken)")
        assert typ == "OK", data
        _, found = conn._untagged_response(typ, data, "METADATA")
        assert found[0][1] == b"t1"
        # delivery: Postfix's LMTP socket -> Dovecot lmtp (vmail) -> auth-userdb
        with smtplib.LMTP(str(relay.ports["lmtp"])) as lmtp:
            msg = f"From: <a@elsewhere.example>\r\nTo: <{addr}>\r\n\r\nhi\r\n"
            assert lmtp.sendmail("a@elsewhere.example", [addr], msg) == {}
        assert conn.select("INBOX") == ("OK", [b"1"])
    finally:
        conn.logout()
    pw_file = Path(relay.config.mailboxes_dir) / addr / "password"
    old_day = (int(time.time()) // DAY - 3) * DAY
    os.utime(pw_file, (old_day, old_day))
    relay.imap(addr, password).logout()  # the last_login plugin -> chatmail-lastlogin
    today = int(time.time()) // DAY * DAY
    assert wait_until(lambda: int(pw_file.stat().st_mtime) == today)


def test_userdb_answer_carries_no_password(relay, account):
    addr, _ = account
    with DictClient(relay.config.doveauth_socket) as client:
        userdb = client.lookup(f"shared/userdb/{addr}", addr)
        passdb = client.lookup(f'shared/passdb/whatever"{addr}', addr)
    assert userdb.startswith("O{"), userdb
    assert "password" not in json.loads(userdb[1:])
    assert json.loads(passdb[1:])["password"].startswith("{SHA512-CRYPT}")
    # what Dovecot makes of it: doveadm shows every userdb field
    shown = subprocess.run(
        ["doveadm", "-c", str(relay.layout.dovecot_config_dir / "dovecot.conf"), "user", addr],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert f"home\t{relay.config.mailboxes_dir}/{addr}" in shown.stdout
    assert "password" not in shown.stdout and "SHA512-CRYPT" not in shown.stdout
