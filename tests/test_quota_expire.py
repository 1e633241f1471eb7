"""chatmail-quota-expire on generated trees: relief, refusals, exit status."""

from __future__ import annotations

import os

import pytest

from chatmaild.expire import quota as quota_expire

MB = 1024 * 1024


def run(mailtree, target_mb, path, *extra: str) -> int:
    return quota_expire.main(["--config", str(mailtree.ini), *extra, str(target_mb), str(path)])


def fill(mailtree, home, sizes_days):
    """Messages of (size, days_ago) in order; returns their paths."""
    return [
        mailtree.message(home, "cur" if i % 2 else "new", days_ago=d, size=s)
        for i, (s, d) in enumerate(sizes_days)
    ]


def test_relieves_oldest_first_down_to_target(mailtree, capsys):
    mailtree.reconfigure(large_message_size="10M")  # only the quota rule applies here
    home = mailtree.account(mailtree.addr("full"))
    msgs = fill(mailtree, home, [(MB, 10 - i) for i in range(8)])  # 8 MiB, oldest first
    young = mailtree.message(home, ".DeltaChat/cur", days_ago=0.2, size=MB)
    mailtree.extra(home, "maildirsize", b"9437184 9\n")
    assert run(mailtree, 5, home) == 0
    err = capsys.readouterr().err
    assert err == f"quota-expire: removed 4 message(s) from {home.name}\n"
    assert [p.exists() for p in msgs] == [False] * 4 + [True] * 4
    assert young.exists()
    assert not (home / "maildirsize").exists()
    assert home.exists() and (home / "password").exists()


def test_applies_age_rules_and_never_removes_the_account(mailtree, capsys):
    home = mailtree.account(mailtree.addr("idle"), login_days_ago=365)
    old = mailtree.message(home, "cur", days_ago=30)
    large = mailtree.message(home, "cur", days_ago=8, size=300000)
    kept = mailtree.message(home, "new", days_ago=8, size=300000)
    assert run(mailtree, 100, home) == 0
    assert capsys.readouterr().err == f"quota-expire: removed 2 message(s) from {home.name}\n"
    assert not old.exists() and not large.exists() and kept.exists()
    assert (home / "password").exists()


def test_recent_mail_is_never_removed(mailtree, capsys):
    home = mailtree.account(mailtree.addr("recent"))
    msgs = fill(mailtree, home, [(2 * MB, 0.9)] * 5)
    mailtree.extra(home, "maildirsize", b"x\n")
    assert run(mailtree, 1, home) == 0
    assert capsys.readouterr().err == ""  # nothing removed: no line for mtail to count
    assert all(p.exists() for p in msgs)
    assert (home / "maildirsize").exists()


def test_trailing_slash_and_relative_dots_inside_are_accepted(mailtree, capsys):
    home = mailtree.account(mailtree.addr("slash"))
    old = mailtree.message(home, "cur", days_ago=2, size=3 * MB)
    assert run(mailtree, 1, f"{mailtree.root}/./{home.name}/") == 0
    assert not old.exists()
    assert "removed 1 message(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make_path",
    [
        lambda t, o: o,  # a directory outside mailboxes_dir
        lambda t, o: t.root / ".." / "outside",  # .. out of mailboxes_dir
        lambda t, o: t.root / ".." / t.addr("nested"),  # account-like name, wrong parent
        lambda t, o: t.root / t.addr("nested") / "cur",  # not directly inside
        lambda t, o: t.root / "no-at-sign",  # not an account name
        lambda t, o: t.root / t.addr("symlinked"),  # symlink to the outside
        lambda t, o: t.base / "alias" / t.addr("nested"),  # symlinked parent directory
        lambda t, o: t.root,
        lambda t, o: "relative@chat.example.org",
    ],
)
def test_refuses_paths_outside_mailboxes_dir(mailtree, outside, make_path, capsys):
    nested = mailtree.account(mailtree.addr("nested"))
    nested_msg = mailtree.message(nested, "cur", days_ago=30, size=MB)
    os.symlink(outside, mailtree.root / mailtree.addr("symlinked"))
    os.symlink(outside, mailtree.base / "alias")
    # an account-looking directory next to (not in) mailboxes_dir, full of old mail
    sibling = mailtree.base / mailtree.addr("nested")
    mailtree.message(sibling, "cur", days_ago=30, size=MB)
    (mailtree.root / "no-at-sign").mkdir()
    mailtree.message(mailtree.root / "no-at-sign", "cur", days_ago=30, size=MB)
    before = mailtree.snapshot()
    assert run(mailtree, 0, make_path(mailtree, outside)) == 0
    assert mailtree.snapshot() == before
    assert nested_msg.exists()
    assert "removed" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["5"],
        ["five", "/x"],
        ["--bogus", "5", "/x"],
        ["-1", "/x"],
    ],
)
def test_bad_arguments_exit_zero(mailtree, argv, capsys):
    home = mailtree.account(mailtree.addr("safe"))
    msg = mailtree.message(home, "cur", days_ago=30)
    assert quota_expire.main(["--config", str(mailtree.ini), *argv]) == 0
    assert msg.exists()
    assert "quota-expire" in capsys.readouterr().err


def test_missing_config_exits_zero_and_does_nothing(mailtree, capsys):
    home = mailtree.account(mailtree.addr("safe"))
    msg = mailtree.message(home, "cur", days_ago=30)
    rc = quota_expire.main(["--config", str(mailtree.base / "missing.ini"), "0", str(home)])
    assert rc == 0 and msg.exists()
    assert "config file not found" in capsys.readouterr().err


def test_config_from_environment(mailtree, monkeypatch, capsys):
    home = mailtree.account(mailtree.addr("env"))
    msg = mailtree.message(home, "cur", days_ago=30)
    monkeypatch.setenv("CHATMAIL_INI", str(mailtree.ini))
    assert quota_expire.main(["100", str(home)]) == 0
    assert not msg.exists()
    assert capsys.readouterr().err == f"quota-expire: removed 1 message(s) from {home.name}\n"
