"""Mail submitted without pause to an installed relay, and the count afterwards.

    python -m tests.deb_load load WORKDIR MAIL_DOMAIN
    python -m tests.deb_load verify WORKDIR

Run by tests/test_deb.py in a booted machine's network namespace while the
package is upgraded, removed and installed again.  ``load`` gets a sender and
three recipients from ``/new`` on 443, logs each in (which creates it), sets a
push token on each recipient, prints ``ready`` and then submits encrypted mail
over 465 round the recipients until WORKDIR/stop exists, starting over after
every error as the apps do; each message answered 250 is appended to
WORKDIR/accepted (``RCPT MESSAGE-ID``), errors are counted by kind.  ``verify``
logs every account in again and prints, as JSON, what each recipient's INBOX
holds of the accepted messages and whether its token is still there.

For a soak (bench/bench_soak.py): LOAD_RATE=N submits at most N messages a
second; LOAD_EXTRA=1 also logs one of the accounts in every second and creates a
new account (from /new, logged in, a push token set) every 10 s, which
``verify`` logs in again.  LOAD_REMOTE=ADDR[,ADDR...] sends every fifth message
to one of those addresses of another domain instead (bench/soakpeer.py counts
them); ``verify`` also counts WORKDIR/accepted-in (mail the relay took on port 25
for the recipients) as ``in_*``.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import imaplib
import json
import os
import re
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from testing.mails import encrypted_message

HOST = "127.0.0.1"
RECIPIENTS = 3
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.I | re.M)
imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))


def _ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the machine's self-signed certificate
    return ctx


def new_credentials(mail_domain: str) -> tuple[str, str]:
    """From POST /new on 443, as the apps get them (also tests/deb_client.py's)."""
    conn = http.client.HTTPSConnection(HOST, 443, context=_ctx(), timeout=30)
    conn.request("POST", "/new", headers={"Host": mail_domain})
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"/new answered {resp.status}: {body[:200]!r}")
    creds = json.loads(body)
    if not creds["email"].endswith("@" + mail_domain):
        raise RuntimeError(f"/new made {creds['email']}")
    return creds["email"], creds["password"]


def _imap(addr: str, password: str) -> imaplib.IMAP4_SSL:
    conn = imaplib.IMAP4_SSL(HOST, 993, ssl_context=_ctx(), timeout=30)
    conn.login(addr, password)
    return conn


def load(workdir: Path, mail_domain: str) -> int:
    sender = new_credentials(mail_domain)
    rcpts = [new_credentials(mail_domain) for _ in range(RECIPIENTS)]
    for addr, password in [sender, *rcpts]:
        conn = _imap(addr, password)
        if (addr, password) != sender:
            typ, data = conn._simple_command(
                "SETMETADATA", "INBOX", f'(/private/devicetoken "tok-{addr}")'
            )
            if typ != "OK":
                raise RuntimeError(f"SETMETADATA: {data}")
        conn.logout()
    (workdir / "accounts.json").write_text(json.dumps({"sender": sender, "rcpts": rcpts}))
    print("ready", flush=True)
    errors: collections.Counter[str] = collections.Counter()
    stop = workdir / "stop"
    if os.environ.get("LOAD_EXTRA"):
        threading.Thread(target=_extra, args=(workdir, mail_domain, [sender, *rcpts], errors),
                         daemon=True).start()  # fmt: skip
    pause = 1 / float(os.environ["LOAD_RATE"]) if os.environ.get("LOAD_RATE") else 0.0
    remote = [a for a in os.environ.get("LOAD_REMOTE", "").split(",") if a]
    i = 0
    with open(workdir / "accepted", "a") as accepted:
        while not stop.exists():
            try:
                with smtplib.SMTP_SSL(HOST, 465, context=_ctx(), timeout=30) as smtp:
                    smtp.login(*sender)
                    while not stop.exists():
                        rcpt = rcpts[i % RECIPIENTS][0]
                        if remote and i % 5 == 4:
                            rcpt = remote[i // 5 % len(remote)]
                        msg = encrypted_message(sender[0], [rcpt], subject=f"load {i}")
                        mid = MESSAGE_ID.search(msg).group(1).decode()
                        smtp.sendmail(sender[0], [rcpt], msg)
                        accepted.write(f"{rcpt} {mid}\n")
                        accepted.flush()
                        i += 1
                        time.sleep(pause)
            except (OSError, smtplib.SMTPException) as e:
                code = getattr(e, "smtp_code", None)
                errors[type(e).__name__ + (f" {code}" if code else "")] += 1
                with open(workdir / "errors.log", "a") as log:  # when, for the journal
                    log.write(f"{time.strftime('%H:%M:%S')} {type(e).__name__} {e}\n"[:300])
                time.sleep(0.2)
    (workdir / "errors.json").write_text(json.dumps(errors))
    return 0


def _extra(workdir: Path, mail_domain: str, accounts: list, errors: collections.Counter) -> None:
    """Logins every second, a new account with a push token every 10 s."""
    made = workdir / "created"
    n = 0
    while not (workdir / "stop").exists():
        try:
            _imap(*accounts[n % len(accounts)]).logout()
            if n % 10 == 0:
                addr, password = new_credentials(mail_domain)
                conn = _imap(addr, password)
                typ, _ = conn._simple_command(
                    "SETMETADATA", "INBOX", f'(/private/devicetoken "tok-{addr}")'
                )
                conn.logout()
                if typ != "OK":  # refused (a daemon restarting): no token was kept
                    raise RuntimeError(f"SETMETADATA {typ}")
                with open(made, "a") as f:
                    f.write(f"{addr} {password}\n")
        except (OSError, imaplib.IMAP4.error, RuntimeError) as e:
            errors[f"extra {type(e).__name__}"] += 1
        n += 1
        time.sleep(1)


def verify(workdir: Path) -> int:
    accounts = json.loads((workdir / "accounts.json").read_text())
    expected: dict[str, dict[str, list[str]]] = {"": collections.defaultdict(list),
                                                 "in_": collections.defaultdict(list)}  # fmt: skip
    for prefix, name in (("", "accepted"), ("in_", "accepted-in")):
        path = workdir / name
        for line in path.read_text().splitlines() if path.exists() else []:
            rcpt, mid = line.split()
            expected[prefix][rcpt].append(mid)
    _imap(*accounts["sender"]).logout()  # the sender's account is there
    result = {"accepted": 0, "delivered": 0, "lost": 0, "twice": 0, "tokens": 0,
              "twice_ids": []}  # fmt: skip
    if (workdir / "accepted-in").exists():
        result.update(in_accepted=0, in_delivered=0, in_lost=0, in_twice=0)
    for addr, password in accounts["rcpts"]:
        conn = _imap(addr, password)
        conn.select("INBOX", readonly=True)
        typ, data = conn.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        found: collections.Counter[str] = collections.Counter()
        for item in data if typ == "OK" else []:
            if isinstance(item, tuple) and (m := MESSAGE_ID.search(item[1])):
                found[m.group(1).decode()] += 1
        typ, data = conn._simple_command("GETMETADATA", "INBOX", "(/private/devicetoken)")
        _, meta = conn._untagged_response(typ, data, "METADATA")
        if f"tok-{addr}".encode() in repr(meta).encode():
            result["tokens"] += 1
        conn.logout()
        for prefix, mids in expected.items():
            for mid in mids[addr]:
                result[prefix + "accepted"] += 1
                result[prefix + "delivered"] += found[mid] > 0
                result[prefix + "lost"] += found[mid] == 0
                result[prefix + "twice"] += max(found[mid] - 1, 0)
                if found[mid] > 1:
                    result["twice_ids"].append(mid)
    made = workdir / "created"
    created = [line.split() for line in made.read_text().splitlines()] if made.exists() else []
    result["created"] = len(created)
    for addr, password in created:  # each logs in, its token kept
        conn = _imap(addr, password)
        typ, data = conn._simple_command("GETMETADATA", "INBOX", "(/private/devicetoken)")
        _, meta = conn._untagged_response(typ, data, "METADATA")
        result["tokens"] += f"tok-{addr}".encode() in repr(meta).encode()
        conn.logout()
    errors = workdir / "errors.json"
    result["errors"] = json.loads(errors.read_text()) if errors.exists() else {}
    print(json.dumps(result), flush=True)
    return 0


# -- the host's side (tests/test_deb_upgrade.py, bench/bench_soak.py)


def lift_limits(m) -> None:
    """No limit of the relay's may refuse the load (the machine sees the host's load
    average, past max_load_1m on a busy host), applied as an operator would."""
    ini = "/etc/chatmail/chatmail.ini"
    keys = ("max_load_1m", "max_user_send_per_minute", "max_user_send_burst_size")
    m.sh(f"sed -i -E '/^({'|'.join(keys)}) *=/d' {ini}"  # set already, by an earlier step
         f" && printf '{keys[0]} = 1000\\n{keys[1]} = 1000000\\n{keys[2]} = 1000000\\n'"
         f" >> {ini} && chatmaild setup 2>&1")  # fmt: skip


def accepted(workdir: Path) -> int:
    """Messages the load got a 250 for so far."""
    path = workdir / "accepted"
    return len(path.read_text().splitlines()) if path.exists() else 0


def flowing(workdir: Path, proc: subprocess.Popen, more: int = 20, timeout: float = 180) -> None:
    """Until the load got ``more`` further 250s (the relay takes mail again)."""
    goal, deadline = accepted(workdir) + more, time.monotonic() + timeout
    while accepted(workdir) < goal:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"mail did not flow again ({accepted(workdir)})"
        time.sleep(0.2)


def start(m, workdir: Path, mail_domain: str, env: dict | None = None) -> subprocess.Popen:
    """``load`` in machine ``m``'s network namespace, once it printed ``ready``."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        m.netns_argv([sys.executable, "-m", "tests.deb_load", "load", str(workdir), mail_domain]),
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if not proc.stdout or proc.stdout.readline().strip() != "ready":
        proc.wait(timeout=60)
        raise RuntimeError("the load did not start: " + (proc.stderr.read() if proc.stderr else ""))
    return proc


def _stop(workdir: Path, proc: subprocess.Popen) -> None:
    (workdir / "stop").touch()
    proc.wait(timeout=120)


@contextlib.contextmanager
def running(m, workdir: Path, mail_domain: str, env: dict | None = None):
    """``start``'s load for the block; stopped if the block fails (otherwise the
    caller ends it with ``stop_drain_count``)."""
    proc = start(m, workdir, mail_domain, env)
    try:
        yield proc
    except BaseException:
        _stop(workdir, proc)
        raise


def stop_drain_count(m, workdir: Path, proc: subprocess.Popen, drain: int = 180) -> dict:
    """Stop the load, flush the queue until it is empty (what was deferred while
    a server restarted goes out now), then ``verify``'s counts."""
    _stop(workdir, proc)
    m.sh(f"for i in $(seq {drain}); do postqueue -f; [ -z \"$(postqueue -j)\" ] && exit 0;"
         " sleep 1; done; postqueue -j; exit 1", timeout=drain + 120)  # fmt: skip
    res = subprocess.run(
        m.netns_argv([sys.executable, "-m", "tests.deb_load", "verify", str(workdir)]),
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(res.stdout + res.stderr)
    return json.loads(res.stdout)


if __name__ == "__main__":
    if sys.argv[1] == "load":
        raise SystemExit(load(Path(sys.argv[2]), sys.argv[3]))
    raise SystemExit(verify(Path(sys.argv[2])))
