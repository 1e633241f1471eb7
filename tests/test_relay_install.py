"""`make install` on this host, sealed off: overlays for the system directories
and a private network namespace (see tests/install_harness.sh).

Proves the production path end to end: install (twice: idempotent), the
rendered production Postfix/Dovecot configs start, the daemons start from
their unit files' command lines, a new account can log in, send and receive
on the standard ports, and uninstall keeps mail, config and keys.
Needs PyPI for the package's virtualenv."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.sandbox import world_readable_tempdir

pytestmark = [pytest.mark.relay, pytest.mark.timeout(420)]
ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import http.client, imaplib, json, secrets, smtplib, socket, ssl, sys, time
    from testing.mails import encrypted_message

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 60
    for port in (25, 143, 443, 465, 587, 993):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"port {port} never opened")
                time.sleep(0.1)

    # the installed package (templates as package data) serves the home page on 443
    conn = http.client.HTTPSConnection("127.0.0.1", 443, context=ctx, timeout=10)
    conn.request("GET", "/", headers={"Host": "chat.example.org"})
    home = conn.getresponse()
    assert home.status == 200, home.status
    assert b"DCACCOUNT:https://chat.example.org/new" in home.read()
    conn.request("POST", "/new", headers={"Host": "chat.example.org"})
    creds = json.loads(conn.getresponse().read())
    addr, password = creds["email"], creds["password"]
    assert addr.endswith("@chat.example.org"), addr

    imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
    imap.login(addr, password)
    # the app versions file is part of the installed package
    imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))
    typ, data = imap._simple_command(
        "GETMETADATA", '""', "(/shared/vendor/deltachat/appversions)")
    _, found = imap._untagged_response(typ, data, "METADATA")
    assert typ == "OK" and isinstance(found[0], tuple), found
    assert json.loads(found[0][1])["clients"], found
    with smtplib.SMTP_SSL("127.0.0.1", 465, context=ctx) as smtp:
        smtp.login(addr, password)
        smtp.sendmail(addr, [addr], encrypted_message(addr, [addr]))
    with smtplib.SMTP("127.0.0.1", 587) as smtp:
        smtp.starttls(context=ctx)
        smtp.login(addr, password)
        smtp.sendmail(addr, [addr], encrypted_message(addr, [addr]))
    while True:
        imap.select("INBOX")
        _, nums = imap.search(None, "ALL")
        if len(nums[0].split()) >= 2:
            break
        if time.monotonic() > deadline:
            sys.exit("mail was not delivered")
        time.sleep(0.2)
    _, data = imap.fetch(b"1", "(RFC822)")
    assert b"multipart/encrypted" in data[0][1]
    assert b"Received:" not in data[0][1]

    # another local user reaches no socket or file that tells about accounts
    import subprocess
    from testing.access import probe_as
    for path in ("/run/doveauth/doveauth.socket", "/run/chatmail-metadata/metadata.socket",
                 "/run/chatmail-lastlogin/lastlogin.socket", "/run/dovecot/auth-userdb"):
        assert probe_as("nobody", "nogroup", "connect", path) == "EACCES", path
    for path in ("/home/vmail", "/home/vmail/mail/chat.example.org"):
        assert probe_as("nobody", "nogroup", "list", path) == "EACCES", path
    shown = subprocess.run(["doveadm", "user", addr], capture_output=True, text=True)
    assert shown.returncode == 0 and "home" in shown.stdout, shown.stdout + shown.stderr
    assert "password" not in shown.stdout, shown.stdout
    print("install check ok", addr)
    """
)


def test_make_install_production_path():
    work = world_readable_tempdir("install-")
    try:
        check = work / "check.py"
        check.write_text(CHECK)
        res = subprocess.run(
            ["unshare", "-m", "--propagation", "private",
             str(ROOT / "tests/install_harness.sh"), str(work), str(check)],
            capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in work.glob("*.log")
        )
        assert res.returncode == 0, res.stdout + res.stderr + logs
        assert "install check ok" in res.stdout
        assert "socket access ok" in res.stdout
        assert "uninstall ok" in res.stdout
        out = (work / "install.out").read_text()
        assert "_domainkey.chat.example.org. 3600 IN TXT" in out
        assert "chat.example.org. 3600 IN MX 10 chat.example.org." in out
    finally:
        shutil.rmtree(work, ignore_errors=True)
