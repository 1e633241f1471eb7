"""Account creation interrupted by kill -9: what it leaves is never an account,
is completed by the next creation, cleaned by chatmail-expire, and no existing
account is ever touched.

Deterministic part: every state a kill can leave (see chatmaild.common.accountlock) is
built exactly as create() writes it.  Then a real doveauth is SIGKILLed while
creations are in flight, several times, and the invariants are checked.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import random
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from chatmaild.common.accountlock import PASSWORD, PASSWORD_LOCK, is_creation_leftover
from chatmaild.common.accounts import (
    FLAG_ENFORCE_E2EE,
    AccountStore,
    hash_password,
    verify_password,
)
from chatmaild.common.config import read_config
from chatmaild.dictd.proxy import tabescape, tabunescape
from chatmaild.expire import main as expire
from testing.rawdict import RawDictClient, wait_for_socket
from tests.fixtures.dict import TEST_DOMAIN, write_test_ini

DAY = 86400
TEMP = "password.tmp-" + "0f" * 8

# the states create() passes through before the rename makes the account (in order),
# and those of versions before the directory lock, which made a password.lock file
STAGES = {
    "directory": {},
    "flag": {FLAG_ENFORCE_E2EE: b""},
    "temp-partial": {FLAG_ENFORCE_E2EE: b"", TEMP: b"{SHA512-CRYPT}$6$ab"},
    "temp-complete": {
        FLAG_ENFORCE_E2EE: b"",
        TEMP: hash_password("someone-elses-password").encode(),
    },
    # renamed, then power lost before the fsync: the name is on disk, the data not
    "renamed-empty": {FLAG_ENFORCE_E2EE: b"", PASSWORD: b""},
    "older-lock": {PASSWORD_LOCK: b""},
    "older-temp-partial": {
        PASSWORD_LOCK: b"",
        FLAG_ENFORCE_E2EE: b"",
        TEMP: b"{SHA512-CRYPT}$6$ab",
    },
}


def half_created(root: Path, addr: str, stage: str, age_days: float = 0) -> Path:
    """``root/addr`` as a creation killed at ``stage`` leaves it."""
    home = root / addr
    home.mkdir(parents=True, mode=0o700)
    for name, data in STAGES[stage].items():
        fd = os.open(home / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
    if age_days:
        then = os.path.getmtime(home) - age_days * DAY
        for path in (*home.iterdir(), home):
            os.utime(path, (then, then))
    return home


def temps_below(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, _, files in os.walk(root) for n in files if ".tmp-" in n]


@pytest.fixture
def store(tmp_path) -> AccountStore:
    return AccountStore(read_config(write_test_ini(tmp_path)))


# ---------------------------------------------------------------- the store


@pytest.mark.parametrize("stage", list(STAGES))
def test_half_created_is_no_account_and_the_next_creation_completes_it(store, stage):
    keep = store.create(f"keep@{TEST_DOMAIN}", "keep-password").account
    keep_hash = keep.password_hash()
    addr = f"crashed@{TEST_DOMAIN}"
    half_created(store.root, addr, stage)

    assert store.lookup(addr) is None
    assert list(store.iter_addresses()) == [keep.addr]

    result = store.create(addr, "my-own-password")
    assert result.created
    assert verify_password("my-own-password", result.account.password_hash())
    # an older version's password.lock stays; a creation now makes no lock file
    made = set(os.listdir(result.account.home)) - set(STAGES[stage])
    assert made <= {FLAG_ENFORCE_E2EE, PASSWORD} and PASSWORD in os.listdir(result.account.home)
    assert list(store.iter_addresses()) == [result.account.addr, keep.addr]
    assert keep.password_hash() == keep_hash


def test_temp_file_of_a_creation_in_progress_is_not_removed(tmp_path):
    store = AccountStore(read_config(write_test_ini(tmp_path)), lock_timeout=0.2)
    addr = f"busy@{TEST_DOMAIN}"
    home = half_created(store.root, addr, "temp-partial")
    # another creator holds the lock and is writing its temp file right now
    holder = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(TimeoutError):
            store.create(addr, "second-password")
        assert (home / TEMP).exists()
        assert store.lookup(addr) is None
    finally:
        os.close(holder)
    # the holder is gone (killed): its temp file is stale now
    assert store.create(addr, "second-password").created
    assert not (home / TEMP).exists()


def test_password_change_removes_stale_temp_and_keeps_the_account(store):
    account = store.create(f"changer@{TEST_DOMAIN}", "first-password").account
    (account.home / TEMP).write_bytes(b"{SHA512-CRYPT}$6$torn")
    store.set_password(account.addr, "second-password")
    assert verify_password("second-password", account.password_hash())
    assert temps_below(store.root) == []


# ---------------------------------------------------------------- chatmail-expire


def test_expire_removes_old_leftovers_only_and_never_an_account(tmp_path, capsys):
    ini = write_test_ini(tmp_path)
    store = AccountStore(read_config(ini))
    accounts = {}
    for name in ("alice", "bob"):
        accounts[name] = store.create(f"{name}@{TEST_DOMAIN}", f"{name}-password").account
    old_temp = accounts["alice"].home / "password.tmp-old"
    old_temp.write_bytes(b"torn")
    then = old_temp.stat().st_mtime - 2 * DAY
    os.utime(old_temp, (then, then))
    young_temp = accounts["bob"].home / "password.tmp-young"
    young_temp.write_bytes(b"being written")
    gone = half_created(store.root, f"gone@{TEST_DOMAIN}", "temp-complete", age_days=2)
    young = half_created(store.root, f"young@{TEST_DOMAIN}", "flag")
    held = half_created(store.root, f"held@{TEST_DOMAIN}", "temp-partial", age_days=2)
    empty = half_created(store.root, f"empty@{TEST_DOMAIN}", "renamed-empty", age_days=2)
    young_empty = half_created(store.root, f"youngempty@{TEST_DOMAIN}", "renamed-empty")
    hashes = {n: a.password_hash() for n, a in accounts.items()}

    assert expire.main(["--config", str(ini)]) == 0  # dry run: nothing changes
    assert gone.exists() and old_temp.exists() and empty.exists()

    holder = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a creation of held@ is running right now
    try:
        assert expire.main(["--config", str(ini), "--remove"]) == 0
    finally:
        os.close(holder)
    out = capsys.readouterr().out
    assert not gone.exists() and not empty.exists()
    assert young.exists() and held.exists() and young_empty.exists()
    assert not old_temp.exists() and young_temp.exists()
    assert {n: a.password_hash() for n, a in accounts.items()} == hashes
    assert "removed 2 of" in out.splitlines()[-1]
    # the leftover creation lock was released: the next run removes it
    assert expire.main(["--config", str(ini), "--remove"]) == 0
    assert not held.exists() and young.exists()


# ---------------------------------------------------------------- a real doveauth, killed


def passdb_line(user: str, password: str) -> str:
    esc = password.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return f"L{tabescape(f'shared/passdb/{esc}' + chr(34) + user)}\t{tabescape(user)}"


def test_sigkill_during_creations_damages_nothing(daemon_factory, tmp_path):
    ini = write_test_ini(tmp_path)
    sock = tmp_path / "doveauth.socket"
    store = AccountStore(read_config(ini))
    passwords: dict[str, str] = {}
    for i in range(3):
        addr = f"old{i}@{TEST_DOMAIN}"
        passwords[addr] = f"old-password-{i}"
        store.create(addr, passwords[addr])
    existing = {a: store.account(a).password_hash() for a in passwords}

    rng = random.Random(14)
    for round_ in range(6):
        daemon = daemon_factory("chatmaild.dictd.doveauth", ini=ini)
        wait_for_socket(sock, proc=daemon.proc)
        clients = [RawDictClient(sock) for _ in range(6)]
        try:
            for n, client in enumerate(clients):
                addr = f"r{round_}n{n}@{TEST_DOMAIN}"
                passwords[addr] = secrets.token_urlsafe(12)
                # a login of an existing account rides along with every burst
                old = f"old{n % 3}@{TEST_DOMAIN}"
                client.send(passdb_line(addr, passwords[addr]), passdb_line(old, "wrong-pw-x"))
            # creations are in flight (hashing, flag, temp file, fsync, rename): kill
            # at a different moment each round
            time.sleep(rng.uniform(0, 0.03))
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(30)
        finally:
            for client in clients:
                client.close()

    # invariants straight after the kills
    for addr, stored in existing.items():
        assert store.account(addr).password_hash() == stored
    complete = []
    for home in sorted(store.root.iterdir()):
        pw = home / "password"
        if pw.exists():
            assert verify_password(passwords[home.name], pw.read_text()), home.name
            complete.append(home.name)
        else:
            stray = [n for n in os.listdir(home) if not is_creation_leftover(n)]
            assert stray == [], home.name
    assert list(store.iter_addresses()) == complete

    # a fresh doveauth lists exactly the accounts, then every address logs in
    daemon = daemon_factory("chatmaild.dictd.doveauth", ini=ini)
    wait_for_socket(sock, proc=daemon.proc)
    with RawDictClient(sock) as client:
        listed = client.iterate("shared/userdb/")
        assert sorted(k.rpartition("/")[2] for k, _ in listed) == complete
        for addr, password in passwords.items():
            reply = client.request(passdb_line(addr, password))
            assert reply.startswith("O"), (addr, reply)
            fields = json.loads(tabunescape(reply[1:]))
            assert fields["password"] == "{PLAIN}" + password, addr  # verified by doveauth
    assert temps_below(store.root) == []
    assert sorted(store.iter_addresses()) == sorted(passwords)


# ---------------------------------------------------------------- through real Dovecot


def chown_tree(path: Path, uid: int, gid: int) -> None:
    for dirpath, _, files in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), uid, gid)


@pytest.mark.dovecot
def test_leftovers_through_dovecot_doveadm_and_expire(relay):
    vmail = pwd.getpwnam(relay.config.vmail_user)
    root = Path(relay.config.mailboxes_dir)
    conf = str(relay.layout.dovecot_config_dir / "dovecot.conf")

    def doveadm_users() -> set[str]:
        res = subprocess.run(["doveadm", "-c", conf, "user", "*"], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert res.returncode == 0, res.stderr
        return set(res.stdout.split())

    done, done_pw = relay.new_credentials()
    relay.imap(done, done_pw).logout()
    done_hash = (root / done / "password").read_text()
    crashed, crashed_pw = relay.new_credentials()
    chown_tree(half_created(root, crashed, "temp-complete"), vmail.pw_uid, vmail.pw_gid)
    stale, _ = relay.new_credentials()
    chown_tree(half_created(root, stale, "flag", age_days=2), vmail.pw_uid, vmail.pw_gid)

    users = doveadm_users()  # userdb iteration: auth-worker -> doveauth
    assert done in users and crashed not in users and stale not in users

    relay.imap(crashed, crashed_pw).logout()  # created normally through Dovecot
    assert verify_password(crashed_pw, (root / crashed / "password").read_text())
    assert not (root / crashed / TEMP).exists()

    res = subprocess.run(
        ["setpriv", f"--reuid={vmail.pw_uid}", f"--regid={vmail.pw_gid}", "--init-groups",
         relay.python, "-m", "chatmaild.expire.main", "--config", str(relay.ini_path), "--remove"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (root / stale).exists()
    assert (root / done / "password").read_text() == done_hash
    users = doveadm_users()
    assert {done, crashed} <= users and stale not in users
    relay.imap(done, done_pw).logout()
