"""`make run` as a newcomer uses it: from a private checkout, supervised, on port 443,
and two of them exchanging mail."""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testing.mails import encrypted_message
from testing.rawdict import wait_for_socket
from tests.devrelay import ROOT, DevRelay, wait_for_message
from tests.sandbox import world_readable_tempdir

pytestmark = [pytest.mark.relay, pytest.mark.timeout(300)]


@pytest.fixture
def base():
    d = world_readable_tempdir("dev-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def pids_named(state: Path, module: str) -> list[int]:
    """Live processes of the relay in ``state`` whose command line runs ``module``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            status != "Z"
            and module.encode() in cmdline
            and str(state).encode() in b" ".join(cmdline)
        ):
            found.append(int(entry))
    return found


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def send_and_receive(sender: DevRelay, recipient: DevRelay) -> bytes:
    """Encrypted mail from the sender relay's printed account to the recipient's."""
    from_addr, from_pw = sender.printed_account()
    to_addr, to_pw = recipient.printed_account()
    inbox = recipient.imap(to_addr, to_pw)  # creates the account
    with sender.smtp(from_addr, from_pw) as smtp:
        smtp.sendmail(from_addr, [to_addr], encrypted_message(from_addr, [to_addr]))
    try:
        message = wait_for_message(inbox)
    finally:
        inbox.logout()
    assert message is not None, "mail was not delivered"
    return message


def test_make_run_from_a_checkout_other_users_cannot_enter(base):
    """Root's clone lands in /root (0700): the README's `make run` works from there."""
    private = base / "root"
    private.mkdir(mode=0o700)
    checkout = private / "chatmaild"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    env_state = checkout / "state"
    # the newcomer's command, with nothing of this run's environment (VENV=...) in it
    make_run = ["env", "-u", "VENV", "-u", "MAKEFLAGS", "-u", "MAKELEVEL", "make", "run"]
    relay = DevRelay(env_state, cmd=make_run, cwd=checkout)
    target = None
    try:
        # the state moved out of the private tree, behind a link
        assert env_state.is_symlink()
        target = env_state.resolve()
        assert all(os.stat(p).st_mode & 0o001 for p in (target, *target.parents))
        relay.state = target
        # the daemons (vmail) run: an account is made on login, mail goes through filtermail
        message = send_and_receive(relay, relay)
        assert b"multipart/encrypted" in message
        assert pids_named(target, "chatmaild.dictd.main")
    finally:
        rc = relay.stop()
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)
    # make itself reports the interrupt; the relay below it stopped cleanly
    assert "stopped; no process of this relay is left" in relay.output, relay.output
    assert rc in (0, -signal.SIGINT, 2), relay.output


def test_dead_daemons_and_servers_are_restarted(base):
    state = base / "state"
    relay = DevRelay(state)
    try:
        for module in ("chatmaild.dictd.main", "chatmaild.filtermail.main"):
            [victim, *_] = pids_named(state, module)
            os.kill(victim, signal.SIGKILL)
        dovecot = int((state / "dovecot/run/master.pid").read_text())
        os.kill(dovecot, signal.SIGKILL)
        for name in ("dict", "filtermail", "dovecot"):
            assert relay.wait_line(lambda line, n=name: f"restarted {n} " in line), relay.output
        assert relay.wait_line(lambda line: "exited with status -9; restarting in" in line)
        # reaped, not left as zombies
        assert not zombie(victim) and not zombie(dovecot)
        # and serving again (once the new processes listen): a new account logs in, its
        # mail is filtered and delivered
        deadline = time.monotonic() + 30
        while True:
            try:
                relay.imap(*relay.printed_account()).logout()
                break
            except (OSError, imaplib.IMAP4.error):
                assert time.monotonic() < deadline, relay.output
                time.sleep(0.2)
        # filtermail's process (four roles) may still be starting when logins work again
        for sock in ("outgoing", "incoming", "milter"):
            wait_for_socket(state / f"postfix/spool/filtermail/{sock}.sock", timeout=30)
        message = send_and_receive(relay, relay)
        assert b"multipart/encrypted" in message
    finally:
        rc = relay.stop()
    assert rc == 0, relay.output


def test_onboarding_on_port_443_like_the_unit(base):
    """`make run` gives /new what its unit gives it: CAP_NET_BIND_SERVICE."""
    cfg = base / "443.ini"
    cfg.write_text("[params]\nnewemail_port = 443\n")
    # a private network namespace: port 443 of this machine stays untouched
    venv_python = sys.executable
    script = (
        f"set -e; ip link set lo up; exec {venv_python} -m chatmaild.relay"
        f" --state {base}/state --config {cfg}"
    )
    relay = DevRelay(base / "state", cmd=["unshare", "-n", "bash", "-c", script])
    try:
        assert any("https://127.0.0.1:443/new" in line for line in relay.lines), relay.output
        [newemail] = pids_named(base / "state", "chatmaild.web.main")  # its process
        creds = subprocess.run(
            ["nsenter", f"--net=/proc/{newemail}/ns/net", venv_python, "-c",
             "import http.client, ssl, sys\n"
             "ctx = ssl._create_unverified_context()\n"
             "c = http.client.HTTPSConnection('127.0.0.1', 443, context=ctx, timeout=10)\n"
             "c.request('POST', '/new'); r = c.getresponse()\n"
             "sys.stdout.write(r.read().decode())"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert json.loads(creds)["email"].endswith("@chat.example")
    finally:
        rc = relay.stop()
    assert rc == 0, relay.output


def test_two_make_run_relays_exchange_mail(base):
    """`make run` and `make run STATE=... CONFIG=... PEERS=<first state>` federate."""
    second_ini = base / "b.ini"
    second_ini.write_text("[params]\nmail_domain = other.example\n")
    first = DevRelay(base / "a")
    second = None
    try:
        second = DevRelay(base / "b", "--config", str(second_ini), "--peer", str(base / "a"))
        # the first relay links back on its own
        assert first.wait_line(lambda line: "peered with other.example" in line), first.output
        assert second.wait_line(lambda line: "peered with chat.example" in line)
        for sender, recipient in ((first, second), (second, first)):
            message = send_and_receive(sender, recipient)
            assert b"multipart/encrypted" in message
            # it came over HTTPS (filtermail transport) and its DKIM signature was verified
            log = (recipient.state / "log/filtermail.log").read_text()
            assert "Incoming: Filtering encrypted mail." in log
        # a restart of the first relay (new ports are possible) is picked up again
        first.stop()
        time.sleep(0.5)
        first = DevRelay(base / "a")
        assert send_and_receive(second, first)
    finally:
        if second is not None:
            assert second.stop() == 0, second.output
        assert first.stop() == 0, first.output
