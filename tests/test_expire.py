"""chatmail-expire on generated trees: policy, safety and the command line."""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from chatmaild.expire import fsreport, maildir
from chatmaild.expire import main as expire
from chatmaild.expire.maildir import open_root, parse_maildir_name, scan_mailbox
from chatmaild.expire.main import Policy, plan_mailbox
from testing.maildirs import maildir_name
from tests.fixtures.expire import MailTree
from tests.sandbox import world_readable_tempdir

DAY = 86400
SUMMARY_RE = re.compile(
    r"^expire: (removed|dry run, would remove) (\d+) of (\d+) mailboxes and (\d+) of (\d+) "
    r"messages \((\d+) bytes\) in \d+\.\d\d seconds$"
)


def run(mailtree, *args: str, capsys=None) -> tuple[int, str]:
    rc = expire.main([str(mailtree.ini), *args])
    out = capsys.readouterr().out if capsys else ""
    return rc, out


def summary(out: str) -> tuple[str, int, int, int, int, int]:
    line = out.strip().splitlines()[-1]
    m = SUMMARY_RE.match(line)
    assert m, line
    return (m.group(1), *map(int, m.groups()[1:]))


def scan(mailtree, name: str):
    fd = open_root(mailtree.root)
    try:
        return scan_mailbox(fd, name)
    finally:
        os.close(fd)


def policy(mailtree, **kw) -> Policy:
    return Policy.from_config(mailtree.config, mailtree.now, **kw)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, expected",
    [
        ("1700000000.M5P7.host,S=1234,W=1260:2,S", (1700000000, 1234)),
        ("1700000000.M5P7.host,S=1234,W=1260:2,", (1700000000, 1234)),
        ("1700000000.M5P7.host,S=1234,W=1260", (1700000000, 1234)),  # new/ has no info part
        ("1700000000.M5P7.host,W=1260,S=77:2,RS", (1700000000, 77)),
        ("1700000000.M5P7.host:2,S", (1700000000, None)),
        ("1700000000.P1Q2.host", (1700000000, None)),
        ("notanumber.M1.host,S=10:2,S", (None, 10)),
        ("1700000000.host,S=12x:2,S", (1700000000, None)),
        ("\u0661\u0662\u0663.host,S=\u0661:2,S", (None, None)),  # non-ASCII digits
        ("", (None, None)),
        ("msg", (None, None)),
    ],
)
def test_parse_maildir_name(name, expected):
    assert parse_maildir_name(name) == expected


def test_generated_names_roundtrip():
    name = maildir_name(1700000123, 4567)
    assert parse_maildir_name(name) == (1700000123, 4567)
    assert name.endswith(":2,S")
    assert ":" not in maildir_name(1, 2, new=True)


# ---------------------------------------------------------------- scanning


def test_scan_classifies_messages_and_extras(mailtree):
    home = mailtree.account(mailtree.addr("alice"), login_days_ago=3)
    mailtree.message(home, "cur", size=10)
    mailtree.message(home, "new", size=20)
    mailtree.message(home, "tmp", size=30)
    mailtree.message(home, ".DeltaChat/cur", size=40)
    mailtree.extra(home, "dovecot.index", b"12345")
    mailtree.extra(home, "maildirsize", b"1")
    mailtree.extra(home, ".DeltaChat/dovecot-uidlist", b"12")
    mailtree.extra(home, "cur/sub/notamessage-dir-file", b"1")  # nested dir inside cur
    s = scan(mailtree, home.name)
    kinds = sorted((m.relpath.split("/")[0], m.kind, m.size) for m in s.messages)
    assert kinds == [
        (".DeltaChat", "cur", 40),
        ("cur", "cur", 10),
        ("new", "new", 20),
        ("tmp", "tmp", 30),
    ]
    assert s.password_mtime == pytest.approx(mailtree.ago(3))
    assert s.has_password
    # password, dovecot.index, maildirsize, .DeltaChat/dovecot-uidlist, cur/sub/...
    assert s.extra_files == 5
    assert s.symlinks == 0


def test_scan_counts_but_never_follows_symlinks(mailtree, outside):
    home = mailtree.account(mailtree.addr("bob"))
    os.symlink(outside, home / ".Linked")
    os.symlink(outside / "cur" / os.listdir(outside / "cur")[0], home / "cur" / "1.M1.x,S=5:2,S")
    s = scan(mailtree, home.name)
    assert s.messages == []
    assert s.symlinks == 2


def test_scan_refuses_symlinked_mailbox(mailtree, outside):
    os.symlink(outside, mailtree.root / mailtree.addr("link"))
    assert scan(mailtree, mailtree.addr("link")) is None


# ---------------------------------------------------------------- pure policy


def test_plan_inactive_account(mailtree):
    old = mailtree.account(mailtree.addr("old"), login_days_ago=91)
    young = mailtree.account(mailtree.addr("young"), login_days_ago=89)
    p = policy(mailtree)
    assert plan_mailbox(scan(mailtree, old.name), p).remove_reason == "inactive"
    assert plan_mailbox(scan(mailtree, young.name), p).remove_reason is None
    # quota-expire never removes the account itself
    assert plan_mailbox(scan(mailtree, old.name), p, whole=False).remove_reason is None


def test_plan_old_and_large_messages(mailtree):
    home = mailtree.account(mailtree.addr("carol"))
    expected = set()
    for folder in ("cur", "new", "tmp", ".DeltaChat/cur", ".DeltaChat/new", ".Trash/tmp"):
        expected.add(mailtree.message(home, folder, days_ago=21).name)
        mailtree.message(home, folder, days_ago=19)
    big = 200001
    expected.add(mailtree.message(home, "cur", days_ago=8, size=big).name)
    expected.add(mailtree.message(home, ".DeltaChat/cur", days_ago=8, size=big).name)
    mailtree.message(home, "cur", days_ago=8, size=200000)  # not larger than the threshold
    mailtree.message(home, "cur", days_ago=6, size=big)  # large but young
    mailtree.message(home, "new", days_ago=8, size=big)  # large but not fetched yet
    mailtree.message(home, "tmp", days_ago=8, size=big)
    plan = plan_mailbox(scan(mailtree, home.name), policy(mailtree))
    assert plan.remove_reason is None
    got = {m.name: reason for m, reason in plan.deletions}
    assert set(got) == expected
    assert sorted(got.values()).count("large") == 2


def test_plan_large_threshold_from_config(mailtree):
    mailtree.reconfigure(large_message_size="1000", delete_large_after="2")
    home = mailtree.account(mailtree.addr("dave"))
    gone = mailtree.message(home, "cur", days_ago=3, size=1001)
    mailtree.message(home, "cur", days_ago=1, size=5000)
    plan = plan_mailbox(scan(mailtree, home.name), policy(mailtree))
    assert [(m.name, r) for m, r in plan.deletions] == [(gone.name, "large")]


def test_plan_quota_oldest_first_by_name_time(mailtree):
    mailtree.reconfigure(max_mailbox_size="100000")  # target: 70000 bytes
    home = mailtree.account(mailtree.addr("erin"))
    # mtimes all 2 days old; the name timestamps decide the order
    order = []
    for i, folder in enumerate(["cur", "new", ".DeltaChat/cur", "cur", "new", "cur"]):
        msg = mailtree.message(home, folder, days_ago=2, size=20000, name_days_ago=10 - i)
        order.append(msg.name)
    mailtree.message(home, "tmp", days_ago=2, size=500000)  # tmp/ is not in the quota
    plan = plan_mailbox(scan(mailtree, home.name), policy(mailtree))
    assert plan.quota_before == 120000
    assert [m.name for m, r in plan.deletions if r == "quota"] == order[:3]
    assert plan.quota_after == 60000


def test_plan_quota_never_touches_recent_mail(mailtree):
    mailtree.reconfigure(max_mailbox_size="100000")
    home = mailtree.account(mailtree.addr("frank"))
    old = mailtree.message(home, "cur", days_ago=3, size=30000)
    # delivered 2 days ago by name but touched 1 hour ago: protected
    mailtree.message(home, "cur", days_ago=1 / 24, size=30000, name_days_ago=2)
    for _ in range(4):
        mailtree.message(home, "new", days_ago=0.5, size=30000)
    plan = plan_mailbox(scan(mailtree, home.name), policy(mailtree))
    assert [(m.name, r) for m, r in plan.deletions] == [(old.name, "quota")]
    assert plan.quota_after == 150000  # still over 70000: the client sees the quota signal


def test_plan_password_less_policy(mailtree):
    p = policy(mailtree)
    empty_old = mailtree.root / mailtree.addr("emptyold")
    empty_old.mkdir()
    os.utime(empty_old, (mailtree.ago(2), mailtree.ago(2)))
    empty_new = mailtree.root / mailtree.addr("emptynew")
    empty_new.mkdir()
    stale = mailtree.account(mailtree.addr("stale"), login_days_ago=None)
    mailtree.message(stale, "cur", days_ago=100)
    mailtree.extra(stale, "dovecot.index", days_ago=95)
    mailtree.age_dirs(stale, 95)
    busy = mailtree.account(mailtree.addr("busy"), login_days_ago=None)
    old_msg = mailtree.message(busy, "cur", days_ago=30)
    mailtree.extra(busy, "dovecot.index", days_ago=1)
    mailtree.age_dirs(busy, 95)
    emptypw = mailtree.account(mailtree.addr("emptypw"), login_days_ago=200, password=b"")
    mailtree.age_dirs(emptypw, 200)
    linkpw = mailtree.account(mailtree.addr("linkpw"), login_days_ago=None)
    os.symlink("/etc/hostname", linkpw / "password")
    mailtree.age_dirs(linkpw, 200)
    reasons = {
        name: plan_mailbox(scan(mailtree, name), p).remove_reason
        for name in os.listdir(mailtree.root)
    }
    assert reasons == {
        mailtree.addr("emptyold"): "empty",
        mailtree.addr("emptynew"): None,  # maybe an account being created right now
        mailtree.addr("stale"): "abandoned",
        mailtree.addr("busy"): None,  # index touched yesterday
        mailtree.addr("emptypw"): "abandoned",  # an empty password is no password
        mailtree.addr("linkpw"): None,  # odd password entry: hands off
    }
    busy_plan = plan_mailbox(scan(mailtree, busy.name), p)
    assert [(m.name, r) for m, r in busy_plan.deletions] == [(old_msg.name, "old")]


# ---------------------------------------------------------------- on disk


def build_mixed_tree(mailtree):
    """Returns (paths that must go, paths that must stay)."""
    gone, kept = [], []
    inactive = mailtree.account(mailtree.addr("inactive"), login_days_ago=120)
    mailtree.message(inactive, "cur", days_ago=1)
    gone.append(inactive)
    active = mailtree.account(mailtree.addr("active"), login_days_ago=1)
    gone.append(mailtree.message(active, "cur", days_ago=25, size=111))
    gone.append(mailtree.message(active, ".DeltaChat/new", days_ago=25, size=222))
    gone.append(mailtree.message(active, "tmp", days_ago=25, size=333))
    gone.append(mailtree.message(active, "cur", days_ago=10, size=300000))
    kept.append(mailtree.message(active, "cur", days_ago=10, size=1000))
    kept.append(mailtree.message(active, "new", days_ago=10, size=300000))
    kept.append(mailtree.message(active, "tmp", days_ago=1))
    gone.append(mailtree.extra(active, "maildirsize", b"500000\n"))
    kept.append(mailtree.extra(active, "dovecot.index.cache", days_ago=30))
    kept.append(mailtree.extra(active, "metadata.json", days_ago=30))
    untouched = mailtree.account(mailtree.addr("untouched"), login_days_ago=2)
    kept.append(mailtree.message(untouched, "cur", days_ago=3))
    kept.append(mailtree.extra(untouched, "maildirsize", b"1\n"))  # nothing deleted: stays
    return gone, kept


def test_dry_run_changes_nothing(mailtree, outside, capsys):
    build_mixed_tree(mailtree)
    before = mailtree.snapshot()
    rc, out = run(mailtree, capsys=capsys)
    assert rc == 0
    assert mailtree.snapshot() == before
    assert summary(out) == ("dry run, would remove", 1, 3, 5, 9, 300666 + 1000)


def test_remove_acts_exactly(mailtree, outside, capsys):
    gone, kept = build_mixed_tree(mailtree)
    outside_before = mailtree.snapshot(outside)
    rc, out = run(mailtree, "--remove", "-v", capsys=capsys)
    assert rc == 0
    assert summary(out) == ("removed", 1, 3, 5, 9, 300666 + 1000)
    assert [p for p in gone if os.path.lexists(p)] == []
    assert [p for p in kept if not os.path.lexists(p)] == []
    assert mailtree.snapshot(outside) == outside_before
    assert not [n for n in os.listdir(mailtree.root) if n.startswith(".deleting-")]
    # a second run finds nothing more to do
    rc, out = run(mailtree, "--remove", capsys=capsys)
    assert summary(out) == ("removed", 0, 2, 0, 4, 0)


def test_symlinks_pointing_outside_survive(mailtree, outside, capsys):
    outside_before = mailtree.snapshot(outside)
    # an account-named symlink to a directory that looks like an inactive account
    os.symlink(outside, mailtree.root / mailtree.addr("linkedaccount"))
    # an inactive account containing links to the outside: removed, targets stay
    dead = mailtree.account(mailtree.addr("dead"), login_days_ago=200)
    os.symlink(outside, dead / ".Outside")
    os.symlink(outside / "precious", dead / "cur" / "1500000000.M9P9.x,S=1:2,S")
    # a live account whose folder and message links point outside at old "mail"
    live = mailtree.account(mailtree.addr("live"))
    os.symlink(outside, live / ".Folder")
    os.symlink(outside / "cur", live / ".Other")
    os.symlink(outside / "precious", live / "cur" / "1500000000.M8P8.x,S=1:2,S")
    os.symlink(outside / "precious", live / "maildirsize")
    mailtree.message(live, "cur", days_ago=30)
    rc, out = run(mailtree, "--remove", capsys=capsys)
    assert rc == 0
    assert summary(out) == ("removed", 1, 2, 1, 1, 1000)
    assert mailtree.snapshot(outside) == outside_before
    assert not dead.exists()
    assert os.path.islink(mailtree.root / mailtree.addr("linkedaccount"))
    assert os.path.islink(live / ".Folder") and os.path.islink(live / "maildirsize")
    assert os.path.islink(live / "cur" / "1500000000.M8P8.x,S=1:2,S")


def test_folder_swapped_for_symlink_after_scan_is_not_followed(mailtree, outside):
    home = mailtree.account(mailtree.addr("swap"))
    msg = mailtree.message(home, ".Folder/cur", days_ago=30)
    s = scan(mailtree, home.name)
    plan = plan_mailbox(s, policy(mailtree))
    assert [m.name for m, _ in plan.deletions] == [msg.name]
    # an attacker (or a bug) swaps the folder for a symlink holding a same-named file
    os.rename(home / ".Folder", mailtree.base / "moved")
    bait = outside / "cur" / msg.name
    bait.write_text("bait")
    os.symlink(outside, home / ".Folder")
    totals = expire.Totals()
    fd = open_root(mailtree.root)
    try:
        assert expire.apply_plan(fd, s, plan, policy(mailtree), totals, remove=True) == 0
    finally:
        os.close(fd)
    assert bait.exists()
    assert totals.errors == 1


def test_message_vanishing_concurrently_is_skipped(mailtree):
    home = mailtree.account(mailtree.addr("race"))
    a = mailtree.message(home, "new", days_ago=30)
    b = mailtree.message(home, "cur", days_ago=30)
    s = scan(mailtree, home.name)
    plan = plan_mailbox(s, policy(mailtree))
    os.rename(a, home / "cur" / (a.name + ":2,S"))  # Dovecot moved it to cur/ meanwhile
    totals = expire.Totals()
    fd = open_root(mailtree.root)
    try:
        removed = expire.apply_plan(fd, s, plan, policy(mailtree), totals, remove=True)
    finally:
        os.close(fd)
    assert removed == 1 and not b.exists()
    assert (home / "cur" / (a.name + ":2,S")).exists()


def test_odd_names(mailtree, capsys):
    odd = ["x y@chat.example.org", "\u00fcser@chat.example.org", "a\nb@chat.example.org"]
    for name in odd:
        home = mailtree.account(name, login_days_ago=100)
        mailtree.message(home, "cur", days_ago=1)
    # not account names: ignored however old
    for name in ("no-at-sign", ".hidden@chat.example.org", "pending_notifications"):
        home = mailtree.account(name, login_days_ago=300)
        mailtree.message(home, "cur", days_ago=300)
        mailtree.age_dirs(home, 300)
    (mailtree.root / "stray-file@chat.example.org").write_text("x")
    live = mailtree.account(mailtree.addr("live"))
    for name in ("weird name", "12345", "1.2.3,S=", ":2,S", "-rf", "\udcff-bytes"):
        mailtree.message(live, "cur", days_ago=40, name=name)
    keep = mailtree.message(live, "cur", days_ago=1, name="another odd one")
    rc, out = run(mailtree, "--remove", capsys=capsys)
    assert rc == 0
    assert summary(out)[:5] == ("removed", 3, 4, 9, 10)
    assert sorted(os.listdir(mailtree.root)) == sorted(
        [
            ".hidden@chat.example.org",
            "live@chat.example.org",
            "no-at-sign",
            "pending_notifications",
            "stray-file@chat.example.org",
        ]
    )
    assert os.listdir(live / "cur") == [keep.name]


def test_interrupted_account_removal_is_finished(mailtree, monkeypatch, capsys):
    home = mailtree.account(mailtree.addr("crash"), login_days_ago=100)
    mailtree.message(home, ".DeltaChat/cur")

    def crash(root_fd, trash):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(maildir, "remove_trash", crash)
    with pytest.raises(KeyboardInterrupt):
        run(mailtree, "--remove")
    monkeypatch.undo()
    # consistent: the account is gone as a whole, its content sits in one trash dir
    left = os.listdir(mailtree.root)
    assert len(left) == 1 and left[0].startswith(".deleting-")
    trash = mailtree.root / left[0]
    assert (trash / "password").exists()
    capsys.readouterr()
    run(mailtree, capsys=capsys)  # a dry run leaves it
    assert trash.exists()
    rc, out = run(mailtree, "--remove", capsys=capsys)
    assert rc == 0 and os.listdir(mailtree.root) == []


def test_maxnum_and_days(mailtree, capsys):
    for i in range(5):
        home = mailtree.account(mailtree.addr(f"user{i}"), login_days_ago=55 + 10 * i)
        mailtree.message(home, "cur", days_ago=15)
    assert summary(run(mailtree, capsys=capsys)[1])[1:5] == (1, 5, 1, 5)  # user4 is 90+ days
    assert summary(run(mailtree, "--maxnum", "2", capsys=capsys)[1])[1:5] == (0, 2, 0, 2)
    # now = 10 days ago: nothing is old enough
    assert summary(run(mailtree, "--days", "10", capsys=capsys)[1])[1:5] == (0, 5, 0, 5)
    # now = in 30 days: three more accounts inactive, and all mail older than 20 days
    assert summary(run(mailtree, "--days", "-30", capsys=capsys)[1])[1:5] == (4, 5, 5, 5)


def test_textfile(mailtree, capsys):
    build_mixed_tree(mailtree)
    prom = mailtree.base / "prom"
    prom.mkdir()
    old_umask = os.umask(0o077)
    try:
        rc, _ = run(mailtree, "--remove", "--textfile", str(prom), capsys=capsys)
    finally:
        os.umask(old_umask)
    assert rc == 0
    assert os.listdir(prom) == ["expire.prom"]
    path = prom / "expire.prom"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    text = path.read_text()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert values["chatmail_expire_dry_run"] == "0"
    assert values["chatmail_expire_mailboxes"] == "3"
    assert values["chatmail_expire_messages"] == "9"
    assert values['chatmail_expire_removed_mailboxes{reason="inactive"}'] == "1"
    assert values['chatmail_expire_removed_messages{reason="old"}'] == "3"
    assert values['chatmail_expire_removed_messages{reason="large"}'] == "1"
    assert values['chatmail_expire_removed_messages{reason="mailbox"}'] == "1"
    assert values["chatmail_expire_removed_bytes"] == str(300666 + 1000)
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            assert line.endswith(" gauge")
    # an explicit file name is used as is
    target = mailtree.base / "custom.prom"
    run(mailtree, "--textfile", str(target), capsys=capsys)
    assert "chatmail_expire_dry_run 1" in target.read_text()


def test_missing_mailboxes_dir_and_bad_config(mailtree, capsys):
    mailtree.reconfigure(mailboxes_dir=str(mailtree.base / "nope"))
    rc, out = run(mailtree, capsys=capsys)
    assert rc == 0 and summary(out) == ("dry run, would remove", 0, 0, 0, 0, 0)
    mailtree.reconfigure(delete_mails_after="soon")
    with pytest.raises(SystemExit) as exc:
        expire.main([str(mailtree.ini)])
    assert exc.value.code == 78
    assert "delete_mails_after" in capsys.readouterr().err


def test_config_via_option_and_env(mailtree, capsys, monkeypatch):
    home = mailtree.account(mailtree.addr("gone"), login_days_ago=100)
    assert expire.main(["--config", str(mailtree.ini), "--remove"]) == 0
    assert not home.exists()
    home = mailtree.account(mailtree.addr("gone2"), login_days_ago=100)
    monkeypatch.setenv("CHATMAIL_INI", str(mailtree.ini))
    assert expire.main(["--remove"]) == 0
    assert not home.exists()
    assert capsys.readouterr().out.count("expire: removed 1 of 1 mailboxes") == 2


@pytest.mark.parametrize(
    "unit, module, calendar",
    [("chatmail-expire", expire, "*-*-* 00:02:00"), ("chatmail-fsreport", None, "*-*-* 08:02:00")],
)
def test_systemd_units(unit, module, calendar):
    module = module or fsreport
    systemd = Path(__file__).resolve().parents[1] / "systemd"
    service = (systemd / f"{unit}.service").read_text()
    timer = (systemd / f"{unit}.timer").read_text()
    assert "Type=oneshot" in service and "User=vmail" in service
    assert f"OnCalendar={calendar}" in timer and "Persistent=true" in timer
    exec_line = next(x for x in service.splitlines() if x.startswith("ExecStart="))
    argv = exec_line.removeprefix("ExecStart=").split()
    assert argv[0].endswith(f"/{unit}")
    args = module.build_parser().parse_args(argv[1:])  # the flags exist
    assert args.config == "/etc/chatmail/chatmail.ini"
    if module is expire:
        assert args.remove and args.verbose


@pytest.fixture
def vmail_tree(vmail_python):
    """A MailTree in a world-traversable directory whose accounts belong to vmail."""
    vmail = pwd.getpwnam("vmail")
    base = world_readable_tempdir("expire-vmail-")
    tree = MailTree(base, time.time())
    os.chmod(tree.ini, 0o644)
    os.chown(tree.root, vmail.pw_uid, vmail.pw_gid)
    tree.vmail = vmail
    tree.python = vmail_python
    yield tree
    shutil.rmtree(base)


def test_runs_as_vmail_and_carries_on_past_permission_errors(vmail_tree):
    tree = vmail_tree
    home = tree.account(tree.addr("mixed"))
    gone = [
        tree.message(home, "cur", days_ago=30),
        tree.message(home, ".DeltaChat/new", days_ago=30),
    ]
    stuck = tree.message(home, ".Root/cur", days_ago=30)  # directory left owned by root
    dead = tree.account(tree.addr("dead"), login_days_ago=100)
    tree.message(dead, "cur", days_ago=1)
    for dirpath, dirnames, filenames in os.walk(tree.root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if not path.startswith(str(home / ".Root")):
                os.chown(path, tree.vmail.pw_uid, tree.vmail.pw_gid, follow_symlinks=False)
    proc = subprocess.run(
        [
            "setpriv",
            f"--reuid={tree.vmail.pw_uid}",
            f"--regid={tree.vmail.pw_gid}",
            "--init-groups",
            tree.python,
            "-m",
            "chatmaild.expire.main",
            "--config",
            str(tree.ini),
            "--remove",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "cannot remove" in proc.stderr and "Permission denied" in proc.stderr
    assert summary(proc.stdout) == ("removed", 1, 2, 3, 4, 3000)
    assert not any(p.exists() for p in gone) and not dead.exists()
    assert stuck.exists()
    assert (home / "password").exists()


def test_one_removing_run_at_a_time(mailtree, capsys):
    home = mailtree.account(mailtree.addr("locked"), login_days_ago=100)
    fd = os.open(mailtree.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running chatmail-expire does
        rc, out = run(mailtree, "--remove", "--textfile", str(mailtree.base), capsys=capsys)
        assert rc == 0
        assert out == "expire: another chatmail-expire --remove is running, nothing done\n"
        assert home.exists() and not (mailtree.base / "expire.prom").exists()
        # a dry run does not need the lock
        assert summary(run(mailtree, capsys=capsys)[1])[:2] == ("dry run, would remove", 1)
    finally:
        os.close(fd)
    assert summary(run(mailtree, "--remove", capsys=capsys)[1])[:2] == ("removed", 1)
    assert not home.exists()
