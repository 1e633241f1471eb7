"""doveauth over its real socket, speaking the lines Dovecot's dict passdb/userdb sends."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from chatmaild.common.accounts import (
    FLAG_DISABLED,
    AccountStore,
    hash_password,
    verify_password,
)
from chatmaild.common.config import read_config
from chatmaild.dictd.doveauth import split_escaped_key
from chatmaild.dictd.proxy import tabescape, tabunescape
from testing.rawdict import RawDictClient, wait_for_socket
from tests.fixtures.dict import TEST_DOMAIN, write_test_ini


def esc(text: str) -> str:
    """Dovecot's %E: backslash before backslash, double and single quote."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")


def passdb(client: RawDictClient, user: str, password: str) -> dict | None:
    key = f'shared/passdb/{esc(password)}"{esc(user)}'
    reply = client.request(f"L{tabescape(key)}\t{tabescape(user)}")
    if reply == "N":
        return None
    assert reply.startswith("O"), reply
    return json.loads(tabunescape(reply[1:]))


def userdb(client: RawDictClient, user: str) -> dict | None:
    reply = client.request(f"L{tabescape('shared/userdb/' + esc(user))}\t{tabescape(user)}")
    if reply == "N":
        return None
    assert reply.startswith("O"), reply
    return json.loads(tabunescape(reply[1:]))


@pytest.fixture
def auth(doveauth):
    ini, sock, daemon = doveauth
    with RawDictClient(sock, hello=False) as client:
        client.send("H3\t2\t0\t\tauth")
        client.ini = ini
        client.daemon = daemon
        client.store = AccountStore(read_config(ini))
        yield client


ADDR = f"newuser@{TEST_DOMAIN}"


def test_split_escaped_key():
    key = r"laksjdlaksjdlak\\sjdlk\"12j\'3l1/k2j3123" + f'"some42123@{TEST_DOMAIN}'
    assert split_escaped_key(key) == [
        "laksjdlaksjdlak\\sjdlk\"12j'3l1/k2j3123",
        f"some42123@{TEST_DOMAIN}",
    ]
    with pytest.raises(ValueError):
        split_escaped_key("ends in\\")


def test_first_login_creates_account(auth):
    fields = passdb(auth, ADDR, "first-password")
    assert fields["addr"] == ADDR
    assert fields["uid"] == fields["gid"]
    assert fields["home"] == str(auth.store.account(ADDR).home)
    # made with this password: answered in the PLAIN scheme, Dovecot only compares
    assert fields["password"] == "{PLAIN}first-password"
    assert verify_password("first-password", auth.store.account(ADDR).password_hash())
    assert "user" not in fields  # the name was already canonical
    assert f"Created address: {ADDR}" in auth.daemon.log()
    # userdb answers go to doveadm, LMTP and mail processes: never the hash
    user_fields = userdb(auth, ADDR)
    assert "password" not in user_fields
    assert user_fields == {k: v for k, v in fields.items() if k != "password"}


def test_password_with_quotes_backslashes_and_tabs(auth):
    password = "a\\b\"c'd/e\tf g\x01h"
    assert passdb(auth, ADDR, password)["password"] == "{PLAIN}" + password
    assert verify_password(password, auth.store.account(ADDR).password_hash())


def test_existing_account_returns_stored_hash_for_a_wrong_password(auth):
    passdb(auth, ADDR, "first-password")
    again = passdb(auth, ADDR, "some-other-password")
    stored = auth.store.account(ADDR).password_hash()
    assert again["password"] == stored  # Dovecot verifies it and refuses
    assert auth.daemon.log().count("Created address") == 1


def test_right_password_is_answered_plain_once_verified(auth):
    """Existing account, right password: verified here, answered in Dovecot's
    PLAIN scheme (Dovecot only compares); a password with quotes, backslashes
    and tabs too.  The account made again (a new salt): the old password no
    longer passes, the new one does."""
    password = "a\\b\"c'd/e\tf g\x01h"
    auth.store.create(ADDR, hash_password(password), password_is_hash=True)  # not by doveauth
    stored = auth.store.account(ADDR).password_hash()
    assert passdb(auth, ADDR, password + "x")["password"] == stored
    for _ in range(2):  # verified with the stored hash, then remembered
        assert passdb(auth, ADDR, password)["password"] == "{PLAIN}" + password
    assert passdb(auth, ADDR, password + "x")["password"] == stored
    assert auth.store.delete(ADDR)
    passdb(auth, ADDR, "the-new-password")
    assert passdb(auth, ADDR, password)["password"].startswith("{SHA512-CRYPT}")
    assert passdb(auth, ADDR, "the-new-password")["password"] == "{PLAIN}the-new-password"


def test_uppercase_login_maps_to_canonical_user(auth):
    fields = passdb(auth, ADDR.upper(), "first-password")
    assert fields["addr"] == ADDR
    assert fields["user"] == ADDR
    assert userdb(auth, ADDR.upper())["addr"] == ADDR


@pytest.mark.parametrize(
    "user,password,reason",
    [
        (ADDR, "short", "password shorter than"),
        (f"ab@{TEST_DOMAIN}", "long-enough-pw", "localpart must be 3 to 32"),
        (f"bad+char@{TEST_DOMAIN}", "long-enough-pw", "invalid address"),
        (f"x/y@{TEST_DOMAIN}", "long-enough-pw", "invalid address"),
        (f"Ünï@{TEST_DOMAIN}", "long-enough-pw", "non-ASCII"),
        ("user@other.example.net", "long-enough-pw", "is not"),
        (f"webmaster@{TEST_DOMAIN}", "long-enough-pw", "'webmaster' is reserved"),
    ],
)
def test_creation_refused(auth, user, password, reason):
    assert passdb(auth, user, password) is None
    log = auth.daemon.log()
    assert "registration rejected" in log
    assert reason in log
    assert list(auth.store.iter_addresses()) == []


def test_nocreate_blocks_creation_but_not_existing(auth):
    passdb(auth, ADDR, "first-password")
    auth.store.set_registration_blocked(True)
    assert passdb(auth, f"another@{TEST_DOMAIN}", "long-enough-pw") is None
    assert "registration blocked" in auth.daemon.log()
    assert passdb(auth, ADDR, "first-password") is not None
    auth.store.set_registration_blocked(False)
    assert passdb(auth, f"another@{TEST_DOMAIN}", "long-enough-pw") is not None


def test_overload_refuses_creation(daemon_factory, tmp_path):
    ini = write_test_ini(tmp_path, max_load_1m="0.000001", min_free_disk_space="1000000G")
    daemon = daemon_factory("chatmaild.dictd.doveauth", ini=ini)
    wait_for_socket(tmp_path / "doveauth.socket", proc=daemon.proc)
    with RawDictClient(tmp_path / "doveauth.socket") as client:
        assert passdb(client, ADDR, "long-enough-pw") is None
    assert "registration rejected: load average" in daemon.log()


def test_disabled_account_cannot_log_in_but_userdb_answers(auth):
    passdb(auth, ADDR, "first-password")
    auth.store.account(ADDR).set_flag(FLAG_DISABLED, True)
    assert passdb(auth, ADDR, "first-password") is None
    assert userdb(auth, ADDR)["addr"] == ADDR
    assert f"login refused for disabled account {ADDR}" in auth.daemon.log()


def test_userdb_unknown_and_invalid(auth):
    assert userdb(auth, f"nobody@{TEST_DOMAIN}") is None
    assert userdb(auth, "../../etc/passwd") is None
    assert userdb(auth, "") is None


@pytest.mark.parametrize(
    "key",
    [
        "shared/other/x",
        'priv/passdb/pw"user@example.org',
        "shared/passdb/no-separator",
        'shared/passdb/a"b"c',
        "shared",
        "shared/passdb/trailing\\",
    ],
)
def test_malformed_keys_answer_f(auth, key):
    assert auth.request(f"L{tabescape(key)}\t") == "F"
    assert userdb(auth, ADDR) is None  # still serving


def test_iterate_lists_accounts(auth):
    for name in ("zulu", "alpha", "mike"):
        passdb(auth, f"{name}@{TEST_DOMAIN}", "long-enough-pw")
    rows = auth.iterate("shared/userdb/")
    assert rows == [(f"shared/userdb/{n}@{TEST_DOMAIN}", "") for n in ("alpha", "mike", "zulu")]
    assert auth.iterate("shared/userdb/", max_rows=2) == rows[:2]
    assert auth.iterate("shared/passdb/") == []


def test_concurrent_lookups_do_not_fail(doveauth):
    """The reference relay's own test: 50 threads x 5 lookups."""
    _, sock, _ = doveauth
    errors = []

    def worker(i):
        try:
            with RawDictClient(sock) as client:
                for j in range(5):
                    fields = passdb(client, f"user{i:02d}@{TEST_DOMAIN}", "long-enough-pw")
                    assert fields["addr"] == f"user{i:02d}@{TEST_DOMAIN}", j
        except Exception as e:  # collected: asserting in threads would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_200_parallel_first_logins_make_one_account(doveauth):
    ini, sock, daemon = doveauth
    clients = [RawDictClient(sock) for _ in range(200)]
    try:
        for i, client in enumerate(clients):
            key = f'shared/passdb/password-{i:03d}"{ADDR}'
            client.send(f"L{key}\t{ADDR}")
        replies = [client.readline() for client in clients]
    finally:
        for client in clients:
            client.close()
    answers = [json.loads(r[1:])["password"] for r in replies]
    assert daemon.log().count("Created address") == 1
    stored = AccountStore(read_config(ini)).account(ADDR).password_hash()
    assert sum(verify_password(f"password-{i:03d}", stored) for i in range(200)) == 1
    # the one that made it is answered its password (PLAIN), the others the stored hash
    made = [i for i in range(200) if verify_password(f"password-{i:03d}", stored)]
    assert answers == [f"{{PLAIN}}password-{i:03d}" if i in made else stored for i in range(200)]


def test_doveauth_lookup_commands(doveauth):
    ini, sock, _ = doveauth
    with RawDictClient(sock) as client:
        passdb(client, ADDR, "first-password")
    for cmd in (
        [sys.executable, "-m", "chatmaild.dictd.doveauth", "--config", str(ini), "lookup", ADDR],
        [sys.executable, "-m", "chatmaild.admin.main", "-c", str(ini), "doveauth-lookup", ADDR],
        [sys.executable, "-m", "chatmaild.admin.main", "-c", str(ini), "doveauth", "lookup", ADDR],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(proc.stdout)
        assert shown["addr"] == ADDR
        assert "password" not in shown
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatmaild.dictd.doveauth",
            "-c",
            str(ini),
            "lookup",
            "x@" + TEST_DOMAIN,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1
    assert "no account" in missing.stderr


def test_migration_from_legacy_sqlite_db(daemon_factory, tmp_path):
    """The reference relay's old passdb.sqlite moves into the store once, at start."""
    import sqlite3

    from chatmaild.common.accounts import hash_password

    db_path = tmp_path / "passdb.sqlite"
    stored = hash_password("migrated-password")
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE users (addr TEXT PRIMARY KEY, password TEXT, last_login INTEGER)")
        rows = [
            (f"old{i:04d}@{TEST_DOMAIN}", stored, 1_600_000_000 + i * 86400 if i % 2 else "")
            for i in range(1000)
        ]
        rows += [
            (f"ci-abcdef@{TEST_DOMAIN}", stored, ""),
            (f"ac_abcdef@{TEST_DOMAIN}", stored, ""),
            ("../evil@example.org", stored, ""),
        ]
        db.executemany("INSERT INTO users VALUES (?, ?, ?)", rows)
    (tmp_path / "passdb.sqlite-wal").write_bytes(b"")
    ini = write_test_ini(tmp_path, passdb_path=db_path)
    daemon = daemon_factory("chatmaild.dictd.doveauth", ini=ini)
    wait_for_socket(tmp_path / "doveauth.socket", proc=daemon.proc)
    # the socket accepts at once; requests are answered after the migration
    with RawDictClient(tmp_path / "doveauth.socket", timeout=60) as client:
        fields = passdb(client, f"old0002@{TEST_DOMAIN}", "anything")
        assert fields["password"] == stored

    store = AccountStore(read_config(ini))
    addrs = list(store.iter_addresses())
    assert len(addrs) == 1000
    assert all(a.startswith("old") for a in addrs)
    odd = store.account(f"old0001@{TEST_DOMAIN}")
    assert odd.password_hash() == stored
    assert odd.last_login() == (1_600_000_000 + 86400) // 86400 * 86400
    assert not odd.enforces_e2ee_incoming  # old accounts keep accepting cleartext
    assert not db_path.exists()
    assert (tmp_path / "passdb.sqlite.old").exists()
    assert not (tmp_path / "passdb.sqlite-wal").exists()
    assert "migrated 1000 accounts" in daemon.log()
