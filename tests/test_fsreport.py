"""chatmail-fsreport on generated trees: figures, filters and both metric formats."""

from __future__ import annotations

import os
import re
import stat

from chatmaild.expire import fsreport

KIB = 1024
MIB = 1024 * 1024


def metrics(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def build(mailtree):
    """Three user accounts, two CI accounts, one inactive, a symlink and odd entries."""
    a = mailtree.account(mailtree.addr("alice"), login_days_ago=0.5)
    mailtree.message(a, "cur", size=50 * KIB)
    mailtree.message(a, "new", size=600 * KIB)
    mailtree.message(a, ".DeltaChat/cur", size=3 * MIB)
    mailtree.message(a, "tmp", size=11 * MIB)
    mailtree.extra(a, "dovecot.index", b"x" * 1000)
    b = mailtree.account(mailtree.addr("bob"), login_days_ago=35)
    mailtree.message(b, "cur", size=100 * KIB)
    mailtree.extra(b, "maildirsize", b"y" * 24)
    c = mailtree.account(mailtree.addr("carol"), login_days_ago=120)
    mailtree.message(c, "cur", size=1 * MIB)
    ci = mailtree.account("ci-abc@chat.example.org", login_days_ago=0)
    mailtree.message(ci, "cur", size=10)
    mailtree.account("ci-def@chat.example.org", login_days_ago=5)
    mailtree.account("ac_legacy@chat.example.org", login_days_ago=5)
    os.symlink("/etc", mailtree.root / "link@chat.example.org")  # not counted
    (mailtree.root / "pending_notifications").mkdir()  # not an account
    return a


def test_collect_figures(mailtree):
    build(mailtree)
    r = fsreport.collect(str(mailtree.root), mailtree.now)
    assert r.mailboxes == 6
    assert r.ci_mailboxes == 2 and r.user_mailboxes == 4 and r.legacy_ci_mailboxes == 3
    assert r.message_count == 7
    assert r.message_bytes == 0  # generated messages are empty files: S= is not disk usage
    # 6 password files + dovecot.index + maildirsize
    assert r.extra_files == 8
    assert r.extra_bytes == 6 * len(b"{SHA512-CRYPT}x") + 1000 + 24
    sizes = [50 * KIB, 600 * KIB, 3 * MIB, 11 * MIB, 100 * KIB, MIB, 10]
    for threshold, (count, total) in zip(fsreport.SIZE_THRESHOLDS, r.by_size, strict=True):
        selected = [s for s in sizes if s >= threshold]
        assert (count, total) == (len(selected), sum(selected)), threshold
    # non-CI logins: alice 0.5 d, ac_legacy 5 d, bob 35 d, carol 120 d
    assert r.active == {1: 1, 10: 2, 30: 2, 40: 3, 80: 3, 100: 3, 150: 4}


def test_disk_bytes_are_real_file_sizes(mailtree):
    home = mailtree.account(mailtree.addr("disk"))
    msg = mailtree.message(home, "cur", size=5000)
    msg.write_bytes(b"z" * 1234)  # gzipped on disk: smaller than S=
    r = fsreport.collect(str(mailtree.root), mailtree.now)
    assert r.message_bytes == 1234
    assert r.by_size[0] == [1, 5000]


def test_filters(mailtree):
    build(mailtree)
    r = fsreport.collect(str(mailtree.root), mailtree.now, mdir="new")
    assert r.by_size[0] == [1, 600 * KIB]
    r = fsreport.collect(str(mailtree.root), mailtree.now, mdir="tmp")
    assert r.by_size[0] == [1, 11 * MIB]
    # only bob (35 d) and carol (120 d) have logged in at least 30 days ago
    r = fsreport.collect(str(mailtree.root), mailtree.now, min_login_age=30)
    assert r.by_size[0] == [2, 100 * KIB + MIB]
    assert r.mailboxes == 6 and r.extra_files == 8  # filters touch only message figures
    r = fsreport.collect(str(mailtree.root), mailtree.now, maxnum=2)
    assert r.mailboxes == 2  # ac_legacy and alice, by name
    # now 100 days later: alice, ac_legacy and bob logged in 100.5 to 135 days ago
    r = fsreport.collect(str(mailtree.root), mailtree.now + 100 * 86400)
    assert r.active == {**dict.fromkeys(fsreport.ACTIVE_DAYS, 0), 150: 3}


def test_cli_console_and_metric_files(mailtree, capsys):
    build(mailtree)
    out_dir = mailtree.base / "prom"
    out_dir.mkdir()
    legacy = mailtree.base / "www" / "metrics"
    legacy.parent.mkdir()
    old_umask = os.umask(0o077)
    try:
        rc = fsreport.main(
            [str(mailtree.ini), "--textfile", str(out_dir), "--legacy-metrics", str(legacy)]
        )
    finally:
        os.umask(old_umask)
    assert rc == 0
    out = capsys.readouterr().out
    assert "accounts: 6 all, 4 users, 2 ci" in out
    assert "messages by size (at least):" in out
    assert os.listdir(out_dir) == ["fsreport.prom"]
    for path in (out_dir / "fsreport.prom", legacy):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    m = metrics((out_dir / "fsreport.prom").read_text())
    assert m['chatmail_accounts{kind="all"}'] == "6"
    assert m['chatmail_accounts{kind="ci"}'] == "2"
    assert m['chatmail_accounts{kind="user"}'] == "4"
    assert m['chatmail_accounts_active{days="40"}'] == "3"
    assert m['chatmail_messages_count{min_size="1048576"}'] == "3"
    assert m['chatmail_messages_bytes{min_size="10485760"}'] == str(11 * MIB)
    assert m['chatmail_storage_bytes{kind="total"}'] == m['chatmail_storage_bytes{kind="extra"}']
    legacy_text = legacy.read_text()
    assert metrics(legacy_text) == {"accounts": "6", "ci_accounts": "3", "nonci_accounts": "3"}
    assert "# TYPE accounts gauge" in legacy_text and "# HELP ci_accounts" in legacy_text


def test_cli_filters_and_missing_dir(mailtree, capsys):
    build(mailtree)
    assert fsreport.main([str(mailtree.ini), "--mdir", "cur", "--min-login-age", "100"]) == 0
    out = capsys.readouterr().out
    # only carol's one 1 MiB message is counted
    assert re.search(r"\n  >=\s+1\.00 MiB\s+1 files\s+1\.00 MiB\n", out)
    assert re.search(r"\n  >=\s+2\.00 MiB\s+0 files\s+0 B\n", out)
    assert re.search(r"\n  >=\s+0 B\s+1 files\s+1\.00 MiB\n", out)
    mailtree.reconfigure(mailboxes_dir=str(mailtree.base / "none"))
    assert fsreport.main([str(mailtree.ini)]) == 0
    assert "accounts: 0 all, 0 users, 0 ci" in capsys.readouterr().out


def test_report_is_read_only(mailtree, outside):
    build(mailtree)
    os.symlink(outside, mailtree.root / mailtree.addr("alice") / ".Outside")
    before = mailtree.snapshot()
    fsreport.collect(str(mailtree.root), mailtree.now)
    assert mailtree.snapshot() == before
