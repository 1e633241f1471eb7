"""Expiry against real Dovecot 2.3: LMTP delivery, aging, expiry, IMAP view and quota.

A relay (Postfix + Dovecot + doveauth) with a 10 MiB quota serves both tests:
mail is delivered over LMTP, aged with os.utime (or placed as if delivered
days ago), then removed by chatmail-expire (run as vmail, like its systemd
unit) or by chatmail-quota-expire (run by Dovecot's quota-warning service when
a delivery crosses 75 %).  IMAP afterwards must show exactly the remaining
messages and a quota usage equal to their sizes.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import secrets
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatmaild.expire.maildir import parse_maildir_name
from chatmaild.relay import Relay
from testing.maildirs import stored_message
from tests.fixtures.relay import RelayPool

pytestmark = [pytest.mark.dovecot, pytest.mark.postfix, pytest.mark.relay]

DAY = 86400
KIB = 1024
MIB = 1024 * 1024
QUOTA = 10 * MIB


@pytest.fixture(scope="module")
def qrelay() -> Iterator[Relay]:
    pool = RelayPool()
    try:
        yield pool({"max_mailbox_size": "10M"}, components=("postfix", "dovecot", "doveauth"))
    finally:
        pool.close()


def make_message(addr: str, subject: str, body_bytes: int) -> str:
    lines = []
    raw = base64.b64encode(secrets.token_bytes(body_bytes * 3 // 4 + 3)).decode()[:body_bytes]
    for i in range(0, len(raw), 76):
        lines.append(raw[i : i + 76])
    return (
        f"From: sender@example.org\r\nTo: {addr}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{secrets.token_hex(8)}@example.org>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        "Content-Type: text/plain\r\n\r\n" + "\r\n".join(lines) + "\r\n"
    )


def deliver(relay: Relay, addr: str, subject: str, body_bytes: int = 2000) -> None:
    with smtplib.LMTP(str(relay.ports["lmtp"])) as lmtp:
        refused = lmtp.sendmail(
            "sender@example.org", [addr], make_message(addr, subject, body_bytes)
        )
    assert refused == {}


def new_account(relay: Relay) -> tuple[str, str, Path]:
    addr, password = relay.new_credentials()
    conn = relay.imap(addr, password)  # first login creates the account
    conn.select("INBOX")  # and Dovecot its Maildir
    conn.logout()
    return addr, password, Path(relay.config.mailboxes_dir) / addr


def message_files(home: Path) -> list[Path]:
    return sorted(p for d in ("cur", "new") for p in (home / d).iterdir())


def subject_of(path: Path) -> str:
    data = stored_message(path)
    m = re.search(rb"^Subject: (.*)$", data, re.MULTILINE)
    assert m, path
    return m.group(1).decode().strip()


def s_size(path: Path) -> int:
    size = parse_maildir_name(path.name)[1]
    assert size is not None, path.name
    return size


def kib(size: int) -> int:
    """Bytes as IMAP QUOTA reports them (KiB, rounded up)."""
    return -(-size // KIB)


def age(path: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def imap_state(relay: Relay, addr: str, password: str) -> tuple[list[str], int, int]:
    """(subjects in INBOX, quota used KiB, quota limit KiB) as IMAP reports them."""
    conn = relay.imap(addr, password)
    try:
        typ, data = conn.select("INBOX")
        assert typ == "OK"
        count = int(data[0])
        subjects = []
        if count:
            typ, data = conn.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK"
            for item in data:
                if isinstance(item, tuple):
                    subjects.append(item[1].decode().split(":", 1)[1].strip())
        assert len(subjects) == count
        typ, data = conn.getquotaroot("INBOX")
        assert typ == "OK"
        quota_line = next(
            x.decode() for x in data[1] if x and b"STORAGE" in (x if isinstance(x, bytes) else b"")
        )
        m = re.search(r"STORAGE (\d+) (\d+)", quota_line)
        assert m, quota_line
        return subjects, int(m.group(1)), int(m.group(2))
    finally:
        conn.logout()


def run_as_vmail(relay: Relay, *argv: str) -> subprocess.CompletedProcess:
    vmail = pwd.getpwnam("vmail")
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={vmail.pw_uid}",
            f"--regid={vmail.pw_gid}",
            "--init-groups",
            relay.python,
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_expire_removes_aged_mail_and_inactive_accounts(qrelay):
    addr, password, home = new_account(qrelay)
    for subject, size in (("old-1", 2000), ("old-2", 3000), ("big", 300_000), ("fresh", 1000)):
        deliver(qrelay, addr, subject, size)
    subjects, used_kib, limit_kib = imap_state(qrelay, addr, password)
    assert sorted(subjects) == ["big", "fresh", "old-1", "old-2"]
    assert limit_kib == QUOTA // KIB
    # read everything: SELECT moved the mail to cur/, FETCH marks it seen
    conn = qrelay.imap(addr, password)
    conn.select("INBOX")
    conn.fetch("1:*", "(BODY[])")
    conn.logout()
    files = {subject_of(p): p for p in message_files(home)}
    assert set(files) == {"old-1", "old-2", "big", "fresh"}
    assert all(p.parent.name == "cur" for p in files.values())
    age(files["old-1"], 25)
    age(files["old-2"], 21)
    age(files["big"], 8)  # fetched, large, older than delete_large_after
    age(files["fresh"], 6)
    assert (home / "maildirsize").exists()

    gone_addr, gone_password, gone_home = new_account(qrelay)
    deliver(qrelay, gone_addr, "never read")
    age(gone_home / "password", 100)

    proc = run_as_vmail(
        qrelay, "-m", "chatmaild.expire.main", "--config", str(qrelay.ini_path), "--remove"
    )
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"expire: removed (\d+) of \d+ mailboxes and (\d+) of \d+ messages", proc.stdout)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) >= 4, proc.stdout
    assert not gone_home.exists()
    assert [subject_of(p) for p in message_files(home)] == ["fresh"]
    assert not (home / "maildirsize").exists()  # removed so that Dovecot recounts

    subjects, used_kib, _ = imap_state(qrelay, addr, password)
    assert subjects == ["fresh"]
    assert used_kib == kib(s_size(files["fresh"]))
    # the removed account comes back empty on the next login (create-on-login)
    subjects, used_kib, _ = imap_state(qrelay, gone_addr, gone_password)
    assert subjects == [] and used_kib == 0


def test_quota_warning_runs_quota_expire(qrelay):
    addr, password, home = new_account(qrelay)
    vmail = pwd.getpwnam("vmail")
    # twelve 512 KiB messages that arrived three days ago (6 MiB, under the 75 % warning)
    aged = []
    for i in range(12):
        ts = int(time.time()) - 3 * DAY + i * 60
        size = 512 * KIB
        path = home / "cur" / f"{ts}.M{i}P{os.getpid()}.aged,S={size},W={size + 2}:2,S"
        header = f"Subject: aged-{i:02d}\n\n".encode()
        path.write_bytes(header + b"x" * (size - len(header)))
        os.chown(path, vmail.pw_uid, vmail.pw_gid)
        os.utime(path, (ts, ts))
        aged.append(path)
    subjects, used_kib, _ = imap_state(qrelay, addr, password)
    assert len(subjects) == 12 and used_kib == 6 * 1024

    # fresh deliveries: the third one crosses 75 % of 10 MiB
    warn_at = QUOTA * 75 // 100
    for i in range(3):
        deliver(qrelay, addr, f"fresh-{i}", 530_000)
    fresh = [p for p in message_files(home) if p not in aged]
    assert len(fresh) == 3
    total = 12 * 512 * KIB + sum(s_size(p) for p in fresh)
    assert total - s_size(fresh[-1]) < warn_at <= total
    target = (QUOTA // MIB) * 70 // 100 * MIB  # what the template passes (MiB)
    expected = 0
    while total - expected * 512 * KIB > target:
        expected += 1

    log = qrelay.log_dir / "dovecot.log"
    line = f"quota-expire: removed {expected} message(s) from {addr}"
    deadline = time.monotonic() + 30
    while line not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)

    # the oldest went, nothing younger than 24 h was touched
    assert [p.exists() for p in aged] == [False] * expected + [True] * (12 - expected)
    assert (
        all(p.exists() for p in message_files(home) if p in fresh)
        and len([p for p in message_files(home) if p not in aged]) == 3
    )
    remaining = sum(s_size(p) for p in message_files(home))
    assert remaining <= target
    subjects, used_kib, _ = imap_state(qrelay, addr, password)
    assert sorted(subjects) == sorted(
        [f"aged-{i:02d}" for i in range(expected, 12)] + [f"fresh-{i}" for i in range(3)]
    )
    assert used_kib == kib(remaining)


def test_expire_while_delivering_and_reading(qrelay):
    """Unlinking under a running Dovecot: no delivery lost, open sessions keep working."""
    addr, password, home = new_account(qrelay)
    vmail = pwd.getpwnam("vmail")
    old_ts = int(time.time()) - 30 * DAY
    for i in range(300):  # a month-old backlog, as Dovecot would have stored it
        body = f"Subject: old-{i:03d}\n\nold\n".encode()
        path = home / "cur" / f"{old_ts + i}.M{i}P1.old,S={len(body)},W={len(body) + 3}:2,S"
        path.write_bytes(body)
        os.chown(path, vmail.pw_uid, vmail.pw_gid)
        os.utime(path, (old_ts + i, old_ts + i))
    for i in range(5):
        deliver(qrelay, addr, f"keep-{i}")
    reader = qrelay.imap(addr, password)  # a client with the mailbox open meanwhile
    typ, data = reader.select("INBOX")
    assert typ == "OK" and int(data[0]) == 305

    vmail_cmd = ["setpriv", f"--reuid={vmail.pw_uid}", f"--regid={vmail.pw_gid}",
                 "--init-groups", qrelay.python, "-m", "chatmaild.expire.main",
                 "--config", str(qrelay.ini_path), "--remove"]  # fmt: skip
    expire = subprocess.Popen(vmail_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for i in range(30):
            deliver(qrelay, addr, f"during-{i:02d}")
            typ, _ = reader.fetch(str(1 + i % 5), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK"
    finally:
        out, err = expire.communicate(timeout=120)
    assert expire.returncode == 0, err
    assert re.search(r"expire: removed \d+ of \d+ mailboxes and (\d+) of", out)

    # the open session learns about the expunges; Dovecot notices maildir changes by
    # directory mtime (1 s resolution), so a change in the same second shows on a later NOOP
    deadline = time.monotonic() + 15
    while True:
        typ, _ = reader.noop()
        assert typ == "OK"
        typ, data = reader.search(None, "ALL")
        assert typ == "OK"
        if len(data[0].split()) == 35 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(data[0].split()) == 35
    reader.logout()
    subjects, used_kib, _ = imap_state(qrelay, addr, password)
    assert sorted(subjects) == sorted(
        [f"keep-{i}" for i in range(5)] + [f"during-{i:02d}" for i in range(30)]
    )
    assert used_kib == kib(sum(s_size(p) for p in message_files(home)))
    log_lines = (qrelay.log_dir / "dovecot.log").read_text(errors="replace").splitlines()
    problems = [x for x in log_lines if addr in x and re.search(r"Error|Panic|Fatal|orrupt", x)]
    assert problems == []
