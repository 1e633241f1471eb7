"""A full mail store loses nothing (issue 24, item 2).

The relay's mail store (and the push queue below it) is a small filesystem of
its own (tmpfs).  Filled up: mail that got a 250 waits deferred in Postfix's
queue (4xx from Dovecot's LMTP, never a bounce), no Maildir holds a truncated or
leftover file, a new account is refused with its reason, a push token set
before stays intact, chatmail-expire still runs; once space returns, every
message arrives exactly once without anyone acting but Postfix's own retry
(here asked for at once with ``postqueue -f``).
"""

from __future__ import annotations

import errno
import imaplib
import json
import subprocess
import time
from pathlib import Path

import pytest

from testing.mails import encrypted_message
from tests.fixtures.relay import FULL, RelayPool
from tests.sandbox import world_readable_tempdir

pytestmark = [pytest.mark.relay, pytest.mark.timeout(300)]
imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))
MESSAGES = 10


@pytest.fixture(scope="module")
def relay():
    mount = world_readable_tempdir("store-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mount)],
                   check=True)  # fmt: skip
    pool = RelayPool()
    try:
        overrides = {"mailboxes_dir": mount / "chat.example", "min_free_disk_space": "1M"}
        yield pool(overrides, FULL)
    finally:
        pool.close()
        subprocess.run(["umount", str(mount)], check=True)


def fill(path: Path) -> None:
    """Write until the filesystem is full (root: no reserved blocks on tmpfs)."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def showq(relay) -> bytes:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(relay.layout.postfix_queue_dir / "public/showq"))
        data = b""
        while piece := s.recv(65536):
            data += piece
    return data


def queued_from(relay, sender: str) -> dict[str, int]:
    """Messages of ``sender`` in the queue, per queue (Postfix may add notices of
    its own to the postmaster: a resource problem is one of its notify_classes)."""
    fields = showq(relay).split(b"\0")
    counts: dict[str, int] = {}
    record: dict[bytes, bytes] = {}
    i = 0
    while i < len(fields) - 1:
        if not fields[i]:
            if record.get(b"sender") == sender.encode():
                q = record[b"queue_name"].decode()
                counts[q] = counts.get(q, 0) + 1
            record, i = {}, i + 1
            continue
        record.setdefault(fields[i], fields[i + 1])
        i += 2
    return counts


def wait(what, timeout: float = 60.0):
    until = time.monotonic() + timeout
    while not (result := what()):
        assert time.monotonic() < until, "timed out"
        time.sleep(0.5)
    return result


def maildir_files(relay, addr: str, sub: str) -> list[Path]:
    d = Path(relay.config.mailboxes_dir) / addr / sub
    return sorted(d.iterdir()) if d.is_dir() else []


def test_full_store_defers_refuses_and_recovers(relay):
    sender, password = relay.new_credentials()
    rcpt, rcpt_password = relay.new_credentials()
    conn = relay.imap(rcpt, rcpt_password)
    typ, data = conn._simple_command("SETMETADATA", "INBOX", '(/private/devicetoken "tok-1")')
    assert typ == "OK", data
    conn.logout()
    relay.imap(sender, password).logout()
    filler = Path(relay.config.mailboxes_dir).parent / "filler"
    fill(filler)
    try:
        # every message is accepted (Postfix's queue has room) and waits: 4xx, no bounce
        with relay.smtp(sender, password) as smtp:
            for i in range(MESSAGES):
                smtp.sendmail(sender, [rcpt], encrypted_message(sender, [rcpt], subject=f"m{i}"))
        assert wait(lambda: queued_from(relay, sender) == {"deferred": MESSAGES})
        log = (relay.log_dir / "postfix.log").read_text(errors="replace")
        assert "status=bounced" not in log
        assert "status=deferred" in log
        # nothing half-written in a Maildir
        for addr in (sender, rcpt):
            assert maildir_files(relay, addr, "tmp") == []
            assert maildir_files(relay, addr, "new") == []
        # a new account is refused, with its reason in the log
        with pytest.raises(imaplib.IMAP4.error):
            relay.imap(*relay.new_credentials())
        dict_log = (relay.log_dir / "dict.log").read_text(errors="replace")
        assert "registration rejected: free disk space" in dict_log
        # a push token set now may fail; the one set before stays, its file whole
        conn = relay.imap(rcpt, rcpt_password)
        conn._simple_command("SETMETADATA", "INBOX", '(/private/devicetoken "tok-2")')
        typ, data = conn._simple_command("GETMETADATA", "INBOX", "(/private/devicetoken)")
        _, found = conn._untagged_response(typ, data, "METADATA")
        assert typ == "OK" and b"tok-1" in repr(found).encode(), found
        conn.logout()
        token_file = Path(relay.config.mailboxes_dir) / rcpt / "metadata.json"
        assert "tok-1" in json.loads(token_file.read_text())["devicetoken"]
        # chatmail-expire still runs on a full store
        expire = subprocess.run(
            [relay.layout.program("chatmail-expire"), "--config", str(relay.ini_path),
             "--remove"], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert expire.returncode == 0, expire.stdout + expire.stderr
    finally:
        filler.unlink()
    # space is back: every message arrives once (Postfix retries; asked at once here)
    conf = str(relay.layout.postfix_config_dir)
    subprocess.run(["postqueue", "-c", conf, "-f"], check=True)
    wait(lambda: len(maildir_files(relay, rcpt, "new")) >= MESSAGES)
    time.sleep(1)
    conn = relay.imap(rcpt, rcpt_password)  # as the app sees the mailbox
    conn.select("INBOX", readonly=True)
    typ, data = conn.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    conn.logout()
    ids = [part[1].strip() for part in data if isinstance(part, tuple)]
    assert len(ids) == len(set(ids)) == MESSAGES, ids  # each once
    assert queued_from(relay, sender) == {}
    relay.imap(*relay.new_credentials()).logout()  # accounts are created again
