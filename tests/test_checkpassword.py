"""The checkpassword program, driven exactly as Dovecot's auth process drives it.

Dovecot writes ``user NUL password NUL NUL`` to fd 3 and reads the fields that
its own checkpassword-reply program writes to fd 4; these tests do the same,
with Dovecot's real checkpassword-reply.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chatmaild.accounts import FLAG_DISABLED, AccountStore, verify_password
from chatmaild.config import read_config
from tests.fixtures.dict import TEST_DOMAIN, write_test_ini
from tests.sandbox import world_readable_tempdir

REPLY = "/usr/lib/dovecot/checkpassword-reply"
ADDR = f"cpuser@{TEST_DOMAIN}"


def run_checkpassword(
    ini: Path | None,
    user: str,
    password: str | None,
    *,
    env: dict[str, str] | None = None,
    reply: list[str] | None = None,
    raw_input: bytes | None = None,
) -> tuple[int, dict[str, str], str]:
    """Run the program like Dovecot; return (exit status, reply fields, stderr)."""
    in_r, in_w = os.pipe()  # fd 3 of the child: our request
    out_r, out_w = os.pipe()  # fd 4 of the child: checkpassword-reply's answer
    data = raw_input
    if data is None:
        data = user.encode() + b"\0" + (password or "").encode() + b"\0\0"
    os.write(in_w, data)
    os.close(in_w)

    def fds():
        os.dup2(in_r, 3)
        os.dup2(out_w, 4)

    cmd = [sys.executable, "-m", "chatmaild.checkpassword"]
    if ini is not None:
        cmd += ["--config", str(ini)]
    cmd += [REPLY] if reply is None else reply
    child_env = {k: v for k, v in os.environ.items() if k not in ("AUTHORIZED", "CHATMAIL_INI")}
    child_env["ORIG_UID"] = str(os.getuid())  # Dovecot sets it; checkpassword-reply checks it
    child_env.update(env or {})
    proc = subprocess.Popen(
        cmd,
        pass_fds=(in_r, out_w, 3, 4),
        preexec_fn=fds,
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(in_r)
    os.close(out_w)
    _, stderr = proc.communicate(timeout=60)
    with os.fdopen(out_r, "rb") as fp:
        answer = fp.read().decode()
    fields = dict(item.split("=", 1) for item in answer.split("\t") if item)
    return proc.returncode, fields, stderr.decode()


@pytest.fixture
def cp_ini(tmp_path) -> Path:
    return write_test_ini(tmp_path)


@pytest.fixture
def cp_store(cp_ini) -> AccountStore:
    return AccountStore(read_config(cp_ini))


def test_first_login_creates_and_replies_fields(cp_ini, cp_store):
    rc, fields, err = run_checkpassword(cp_ini, ADDR, "first-password")
    assert rc == 0, err
    account = cp_store.account(ADDR)
    assert fields["user"] == ADDR
    assert fields["userdb_home"] == str(account.home)
    assert fields["userdb_uid"] == fields["userdb_gid"] == read_config(cp_ini).vmail_user
    assert "password" not in fields
    assert verify_password("first-password", account.password_hash())
    assert account.enforces_e2ee_incoming
    assert f"Created address: {ADDR}" in err


def test_login_verifies_password(cp_ini, cp_store):
    assert run_checkpassword(cp_ini, ADDR, "first-password")[0] == 0
    stored = cp_store.account(ADDR).password_hash()
    rc, fields, err = run_checkpassword(cp_ini, ADDR, "wrong-password")
    assert rc == 1
    assert fields == {}
    assert "password mismatch" in err
    assert cp_store.account(ADDR).password_hash() == stored  # never overwritten
    assert run_checkpassword(cp_ini, ADDR.upper(), "first-password")[1]["user"] == ADDR


@pytest.mark.parametrize(
    "user,password,reason",
    [
        (ADDR, "short", "password shorter than"),
        (f"x@{TEST_DOMAIN}", "long-enough-pw", "localpart must be"),
        (f"a/b@{TEST_DOMAIN}", "long-enough-pw", "invalid address"),
        ("cpuser@elsewhere.example", "long-enough-pw", "invalid address"),
    ],
)
def test_creation_refused(cp_ini, cp_store, user, password, reason):
    rc, fields, err = run_checkpassword(cp_ini, user, password)
    assert rc == 1
    assert fields == {}
    assert "registration rejected" in err and reason in err
    assert list(cp_store.iter_addresses()) == []


def test_nocreate(cp_ini, cp_store):
    assert run_checkpassword(cp_ini, ADDR, "first-password")[0] == 0
    cp_store.set_registration_blocked(True)
    rc, _, err = run_checkpassword(cp_ini, f"second@{TEST_DOMAIN}", "long-enough-pw")
    assert rc == 1 and "registration blocked" in err
    assert run_checkpassword(cp_ini, ADDR, "first-password")[0] == 0


def test_userdb_lookup_authorized(cp_ini):
    assert run_checkpassword(cp_ini, ADDR, "first-password")[0] == 0
    rc, fields, _ = run_checkpassword(cp_ini, ADDR, None, env={"AUTHORIZED": "1"})
    # checkpassword-reply exits 2 when told AUTHORIZED=2: Dovecot's lookup success
    assert rc == 2
    assert fields["user"] == ADDR
    assert "password" not in fields
    rc, fields, _ = run_checkpassword(
        cp_ini, f"unknown@{TEST_DOMAIN}", None, env={"AUTHORIZED": "1"}
    )
    assert rc == 3
    assert fields == {}


def test_credentials_lookup_returns_hash(cp_ini, cp_store):
    assert run_checkpassword(cp_ini, ADDR, "first-password")[0] == 0
    env = {"AUTHORIZED": "1", "CREDENTIALS_LOOKUP": "1", "SCHEME": "SHA512-CRYPT"}
    rc, fields, _ = run_checkpassword(cp_ini, ADDR, None, env=env)
    assert rc == 2
    assert fields["password"] == cp_store.account(ADDR).password_hash()


def test_disabled_account(cp_ini, cp_store):
    assert run_checkpassword(cp_ini, ADDR, "first-password")[0] == 0
    cp_store.account(ADDR).set_flag(FLAG_DISABLED, True)
    assert run_checkpassword(cp_ini, ADDR, "first-password")[0] == 1
    env = {"AUTHORIZED": "1", "CREDENTIALS_LOOKUP": "1"}
    assert run_checkpassword(cp_ini, ADDR, None, env=env)[0] == 3
    assert run_checkpassword(cp_ini, ADDR, None, env={"AUTHORIZED": "1"})[0] == 2


@pytest.mark.parametrize(
    "data",
    [b"", b"no-nul-at-all", b"user-only\0", b"x" * 600 + b"\0pw\0\0"],
)
def test_misuse_exits_2(cp_ini, data):
    rc, fields, _ = run_checkpassword(cp_ini, "", None, raw_input=data)
    assert rc == 2
    assert fields == {}


def test_no_reply_program_exits_2(cp_ini):
    assert run_checkpassword(cp_ini, ADDR, "first-password", reply=[])[0] == 2


def test_bad_config_is_temporary_failure(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[params]\nmail_domain = nodots\n")
    rc, _, err = run_checkpassword(ini, ADDR, "first-password")
    assert rc == 111
    assert "mail_domain" in err


def test_unexecutable_reply_program_is_temporary_failure(cp_ini):
    rc, _, err = run_checkpassword(cp_ini, ADDR, "first-password", reply=["/nonexistent/reply"])
    assert rc == 111
    assert "cannot execute" in err


def test_config_from_environment(cp_ini):
    rc, fields, _ = run_checkpassword(
        None, ADDR, "first-password", env={"CHATMAIL_INI": str(cp_ini)}
    )
    assert rc == 0
    assert fields["user"] == ADDR


def test_parallel_first_logins_make_one_account(cp_ini, cp_store):
    results = []
    lock = threading.Lock()

    def login(i):
        result = run_checkpassword(cp_ini, ADDR, f"password-{i:02d}")
        with lock:
            results.append(result[0])

    threads = [threading.Thread(target=login, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # exactly one password won; every other login was refused, none failed oddly
    assert sorted(results) == [0] + [1] * 39
    stored = cp_store.account(ADDR).password_hash()
    assert sum(verify_password(f"password-{i:02d}", stored) for i in range(40)) == 1


def test_help_reads_like_a_man_page():
    out = subprocess.run(
        [sys.executable, "-m", "chatmaild.checkpassword", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for part in ("chatmail-checkpassword - ", "EXIT STATUS", "AUTHORIZED", "111"):
        assert part in out


def test_root_works_on_store_as_vmail_and_replies_as_root():
    """Started by a root auth process: files belong to vmail, the reply runs as root."""
    import pwd
    import shutil

    vmail = pwd.getpwnam("vmail")
    base = world_readable_tempdir("cp-vmail-")
    try:
        mail = base / "mail"
        mail.mkdir()
        os.chown(mail, vmail.pw_uid, vmail.pw_gid)
        ini = write_test_ini(base, vmail_user="vmail")
        rc, fields, err = run_checkpassword(ini, ADDR, "first-password")
        assert rc == 0, err
        assert fields["userdb_uid"] == "vmail"
        home = mail / ADDR
        for path in (home, home / "password", home / "enforceE2EEincoming"):
            assert path.stat().st_uid == vmail.pw_uid, path
        assert run_checkpassword(ini, ADDR, "wrong-password")[0] == 1
    finally:
        shutil.rmtree(base)
