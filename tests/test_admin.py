"""The `chatmaild` operator command: accounts, registration, config, subcommand plugins."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from chatmaild.admin import main as admin
from chatmaild.common.accounts import AccountStore, verify_password
from chatmaild.common.config import read_config
from tests.fixtures.dict import TEST_DOMAIN

ADDR = f"operator1@{TEST_DOMAIN}"


def chatmaild(ini, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatmaild.admin.main", "--config", str(ini), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


@pytest.fixture
def store(auth_ini) -> AccountStore:
    return AccountStore(read_config(auth_ini))


def test_create_generates_password_printed_once(auth_ini, store):
    res = chatmaild(auth_ini, "account", "create", ADDR.upper())
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(":", 1) for line in res.stdout.splitlines())
    assert lines["address"].strip() == ADDR
    password = lines["password"].strip()
    assert len(password) >= read_config(auth_ini).password_min_length + 3
    assert verify_password(password, store.account(ADDR).password_hash())
    assert f"Created address: {ADDR}" in res.stderr
    again = chatmaild(auth_ini, "account", "create", ADDR)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_create_with_password_from_stdin(auth_ini, store):
    res = chatmaild(auth_ini, "account", "create", "--password-stdin", ADDR, stdin="my-secret-pw\n")
    assert res.returncode == 0, res.stderr
    assert "my-secret-pw" not in res.stdout
    assert verify_password("my-secret-pw", store.account(ADDR).password_hash())
    short = chatmaild(
        auth_ini, "account", "create", "--password-stdin", f"other1@{TEST_DOMAIN}", stdin="x\n"
    )
    assert short.returncode == 1 and "shorter than" in short.stderr


@pytest.mark.parametrize(
    "addr,message",
    [
        ("../../etc@example.org", "not an address of this relay"),
        ("someone@elsewhere.example", "not an address of this relay"),
        (f"ab@{TEST_DOMAIN}", "localpart must be 3 to 32"),
    ],
)
def test_create_refuses_bad_addresses(auth_ini, store, addr, message):
    res = chatmaild(auth_ini, "account", "create", addr)
    assert res.returncode == 1
    assert message in res.stderr
    assert list(store.iter_addresses()) == []


def test_create_ignores_nocreate_file(auth_ini, store):
    store.set_registration_blocked(True)
    assert chatmaild(auth_ini, "account", "create", ADDR).returncode == 0


def test_show_disable_enable_delete(auth_ini, store):
    assert chatmaild(auth_ini, "account", "show", ADDR).returncode == 1
    chatmaild(auth_ini, "account", "create", ADDR)
    shown = chatmaild(auth_ini, "account", "show", ADDR)
    assert shown.returncode == 0
    assert f"address:              {ADDR}" in shown.stdout
    assert "disabled:             no" in shown.stdout
    assert "password" not in shown.stdout.lower().replace("refuses", "")

    assert chatmaild(auth_ini, "account", "disable", ADDR).returncode == 0
    assert store.account(ADDR).is_disabled
    assert "disabled:             yes" in chatmaild(auth_ini, "account", "show", ADDR).stdout
    assert chatmaild(auth_ini, "account", "enable", ADDR).returncode == 0
    assert not store.account(ADDR).is_disabled

    assert chatmaild(auth_ini, "account", "delete", ADDR).returncode == 0
    assert not store.account(ADDR).home.exists()
    gone = chatmaild(auth_ini, "account", "delete", ADDR)
    assert gone.returncode == 1 and "no account" in gone.stderr
    assert chatmaild(auth_ini, "account", "disable", ADDR).returncode == 1


def test_accounts_listing(auth_ini, store):
    assert chatmaild(auth_ini, "accounts").stdout == ""
    for name in ("bravo", "alpha"):
        store.create(f"{name}@{TEST_DOMAIN}", "long-enough-pw")
    store.account(f"bravo@{TEST_DOMAIN}").set_flag("DISABLED", True)
    short = chatmaild(auth_ini, "accounts")
    assert short.stdout.split() == [f"alpha@{TEST_DOMAIN}", f"bravo@{TEST_DOMAIN}"]
    long = chatmaild(auth_ini, "accounts", "-l").stdout.splitlines()
    assert long[0].startswith(f"alpha@{TEST_DOMAIN}\t")
    assert long[0].endswith("\te2ee-incoming")
    assert long[1].endswith("\tdisabled,e2ee-incoming")


def test_registration_block_unblock_status(auth_ini, store):
    assert "registration open" in chatmaild(auth_ini, "registration", "status").stdout
    assert "registration blocked" in chatmaild(auth_ini, "registration", "block").stdout
    assert store.registration_blocked
    assert "registration blocked" in chatmaild(auth_ini, "registration", "status").stdout
    assert "registration open" in chatmaild(auth_ini, "registration", "unblock").stdout
    assert not store.registration_blocked
    bad = chatmaild(auth_ini, "registration", "maybe")
    assert bad.returncode == 2


def test_stale_uidlist_locks_are_listed_and_removed(auth_ini):
    """A killed writer's dovecot-uidlist.lock (no PID in it) would hold its folder up
    for Dovecot's two-minute stale timeout; one with a PID, or one just made, stays."""
    import os
    import time
    from pathlib import Path

    from chatmaild.expire.maildir import UIDLIST_LOCK

    mailboxes = Path(read_config(auth_ini).mailboxes_dir)
    old = time.time() - 60

    def lock(folder: Path, content: bytes, mtime: float = old) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / UIDLIST_LOCK
        path.write_bytes(content)
        os.utime(path, (mtime, mtime))
        return path

    home = mailboxes / f"a@{TEST_DOMAIN}"
    empty = lock(home, b"")  # killed right after creating it
    partial = lock(home / ".DeltaChat", b"3 V1796576822 N12 G0f\n1 :")  # killed while writing
    with_pid = lock(mailboxes / f"b@{TEST_DOMAIN}", b"4242:vm")  # Dovecot checks the PID
    fresh = lock(mailboxes / f"c@{TEST_DOMAIN}", b"", mtime=time.time())  # a live writer
    listed = chatmaild(auth_ini, "stale-locks")
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == sorted(["stale:", str(empty), "stale:", str(partial)])
    assert empty.exists() and partial.exists()
    removed = chatmaild(auth_ini, "stale-locks", "--remove")
    assert removed.stdout.count("removed: ") == 2, removed.stdout
    assert not empty.exists() and not partial.exists()
    assert with_pid.exists() and fresh.exists()
    # what stays is not stale: a second run removes nothing
    assert chatmaild(auth_ini, "stale-locks", "--remove").stdout == ""


def test_doveauth_lookup_without_daemon_fails_cleanly(auth_ini):
    res = chatmaild(auth_ini, "doveauth-lookup", ADDR)
    assert res.returncode == 2
    assert "cannot ask doveauth" in res.stderr


def test_bad_config_exits_78(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[params]\n")
    res = chatmaild(ini, "accounts")
    assert res.returncode == 78
    assert "mail_domain is missing" in res.stderr


def test_help_reads_like_a_man_page(auth_ini):
    top = chatmaild(auth_ini, "--help").stdout
    for part in ("chatmaild - ", "COMMANDS", "FILES", "EXIT STATUS", "registration"):
        assert part in top
    sub = chatmaild(auth_ini, "account", "create", "--help").stdout
    assert "--password-stdin" in sub and "printed once" in sub


# ---------------------------------------------------------------- subcommand plugins

CALLS: list[str] = []


def add_cli(subparsers) -> None:
    """A plugin as other areas write one (see admin.EXTRA_COMMANDS)."""
    p = subparsers.add_parser("hello", help="test plugin")
    p.add_argument("name")
    p.set_defaults(func=lambda args: CALLS.append(args.name) or 0)


def broken_add_cli(subparsers) -> None:
    raise RuntimeError("plugin bug")


def test_extra_commands_are_registered_and_missing_ones_skipped(monkeypatch, capsys):
    monkeypatch.setattr(
        admin,
        "EXTRA_COMMANDS",
        [
            "chatmaild.no_such_component.cli:add_cli",  # not installed: silently skipped
            "tests.test_admin:broken_add_cli",  # broken: reported, others still work
            "tests.test_admin:add_cli",
        ],
    )
    parser = admin.build_parser()
    args = parser.parse_args(["hello", "world"])
    assert args.func(args) == 0
    assert CALLS == ["world"]
    err = capsys.readouterr().err
    assert "tests.test_admin" in err and "plugin bug" in err
    assert "no_such_component" not in err
    # the built-in commands are all still there
    assert isinstance(parser.parse_args(["accounts"]), argparse.Namespace)


def test_default_extra_commands_load(auth_ini):
    """The real plugin entries of the other areas import (when present) without error."""
    res = chatmaild(auth_ini, "--help")
    assert res.returncode == 0
    assert "unavailable" not in res.stderr, res.stderr
