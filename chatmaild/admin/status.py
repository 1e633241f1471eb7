"""``chatmaild status``: is the relay healthy?  One line per check, or JSON.

Checks: the units (under systemd), the certificate's days left, Postfix's
queue (size, age of the oldest message), disk and inode use of the mail
store, the last expiry run, the push backlog; the account count and whether
registration is open are shown too.  Exit status 0 when every check passes,
1 when one does not (usable as a monitoring check), 78 for a bad config.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from chatmaild.common.config import Config

STATUS_DOC = """say whether the relay is healthy (exit 1 naming each problem)

Checks the units (under systemd), the TLS certificate, Postfix's queue, disk
and inode use of the mail store, the last expiry run and the push backlog,
with --dns every DNS record to publish (as `chatmaild dns --check`); shows the
account count and registration.  A table by default, --json for
scripts.  Thresholds: --cert-min-days (7), --queue-max-age (3600 s),
--queue-max (1000 messages), --disk-max-percent (90), --push-max (1000).
"""

UNITS = (
    "chatmail-dict.socket",
    "chatmail-dict.service",
    "filtermail.socket",
    "filtermail.service",
    "chatmail-newemail.service",
    "dovecot.service",
    "coturn.service",
)
TIMERS = ("chatmail-expire.timer", "chatmail-fsreport.timer", "chatmail-acme.timer")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# -- pure judgements (tested alone)


def judge_certificate(not_after: datetime.datetime, now: datetime.datetime, min_days: int) -> Check:
    left = not_after - now
    days = left.total_seconds() / 86400
    if days < 0:
        return Check("certificate", False, f"expired {-days:.0f} days ago ({not_after:%Y-%m-%d})")
    return Check(
        "certificate", days >= min_days, f"{days:.0f} days left (until {not_after:%Y-%m-%d})"
    )


def judge_queue(entries: list[dict], now: float, max_age: float, max_count: int) -> Check:
    if not entries:
        return Check("queue", True, "empty")
    oldest = min(int(e.get("arrival_time", now)) for e in entries)
    age = now - oldest
    by_queue: dict[str, int] = {}
    for e in entries:
        by_queue[e.get("queue_name", "?")] = by_queue.get(e.get("queue_name", "?"), 0) + 1
    parts = ", ".join(f"{n} {q}" for q, n in sorted(by_queue.items()))
    ok = age <= max_age and len(entries) <= max_count
    return Check("queue", ok, f"{len(entries)} message(s) ({parts}), oldest {age:.0f} s")


def judge_disk(path: str, st: os.statvfs_result, max_percent: float) -> Check:
    used = 100 * (1 - st.f_bavail / st.f_blocks) if st.f_blocks else 0.0
    inodes = 100 * (1 - st.f_favail / st.f_files) if st.f_files else 0.0
    ok = used < max_percent and inodes < max_percent
    return Check("disk", ok, f"{path}: {used:.0f} % of space, {inodes:.0f} % of inodes used")


# -- collecting


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def check_units() -> Check:
    """Every unit of the relay active."""
    from chatmaild.relay.system import postfix_runs_in_main_unit

    postfix = "postfix.service" if postfix_runs_in_main_unit() else "postfix@-.service"
    units = [*UNITS, postfix, *TIMERS]
    res = subprocess.run(["systemctl", "is-active", *units], capture_output=True, text=True)
    states = res.stdout.split()
    bad = [f"{u} {s}" for u, s in zip(units, states, strict=False) if s != "active"]
    if len(states) != len(units):
        bad.append("systemctl answered for fewer units")
    return Check("units", not bad, "; ".join(bad) if bad else f"{len(units)} units active")


def check_certificate(config: Config, min_days: int) -> Check:
    from chatmaild.acme.certificate import parse_pem

    path = config.tls_cert_and_key[0]
    try:
        info = parse_pem(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        return Check("certificate", False, f"{path}: {e}")
    now = datetime.datetime.now(datetime.UTC)
    return judge_certificate(info.not_after, now, min_days)


def check_queue(postfix_config: str | None, max_age: float, max_count: int) -> Check:
    cmd = ["postqueue", *(["-c", postfix_config] if postfix_config else []), "-j"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return Check("queue", False, f"postqueue failed: {res.stderr.strip()[:200]}")
    entries = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    return judge_queue(entries, time.time(), max_age, max_count)


def check_disk(config: Config, max_percent: float) -> Check:
    try:
        return judge_disk(config.mailboxes_dir, os.statvfs(config.mailboxes_dir), max_percent)
    except OSError as e:
        return Check("disk", False, f"{config.mailboxes_dir}: {e}")


def check_expiry() -> Check:
    res = subprocess.run(
        ["systemctl", "show", "chatmail-expire.service", "-p", "Result",
         "-p", "ExecMainExitTimestamp"],
        capture_output=True, text=True,
    )  # fmt: skip
    props = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    result, when = props.get("Result", "?"), props.get("ExecMainExitTimestamp") or "never yet"
    return Check("expiry", result == "success", f"last run: {when}, result {result}")


def check_push(config: Config, max_count: int) -> Check:
    try:
        pending = sum(1 for e in os.scandir(config.notification_dir) if e.is_file())
    except FileNotFoundError:
        pending = 0
    except OSError as e:
        return Check("push", False, f"{config.notification_dir}: {e}")
    return Check("push", pending <= max_count, f"{pending} notification(s) waiting")


def check_dns(config: Config, resolver: str | None) -> Check:
    """The records `chatmaild dns` prints, asked of DNS (`dns --check`): each one
    missing or wrong is named."""
    from chatmaild.relay import dnsrecords
    from chatmaild.relay.system import _dkim_txt

    dkim = _dkim_txt(config)
    findings = dnsrecords.check(dnsrecords.records(config, dkim), resolver)
    bad = [f"{f.record.rtype} {f.record.name} {f.status}" for f in findings if f.status != "ok"]
    if dkim is None:
        bad.append(f"DKIM key unreadable ({config.dkim_key_path})")
    return Check("dns", not bad, "; ".join(bad) if bad else f"{len(findings)} records as published")


def info_accounts(config: Config) -> Check:
    try:
        count = sum(1 for e in os.scandir(config.mailboxes_dir) if e.is_dir() and "@" in e.name)
    except OSError as e:
        return Check("accounts", False, f"{config.mailboxes_dir}: {e}")
    blocked = Path(config.nocreate_file).exists()
    return Check("accounts", True, f"{count}, registration {'blocked' if blocked else 'open'}")


def status(config: Config, args: argparse.Namespace) -> list[Check]:
    checks = []
    units = systemd_running() and not args.no_units
    if units:
        checks.append(check_units())
    checks.append(check_certificate(config, args.cert_min_days))
    checks.append(check_queue(args.postfix_config, args.queue_max_age, args.queue_max))
    checks.append(check_disk(config, args.disk_max_percent))
    if units:
        checks.append(check_expiry())
    checks.append(check_push(config, args.push_max))
    if args.dns:
        checks.append(check_dns(config, args.resolver))
    checks.append(info_accounts(config))
    return checks


def cmd_status(args: argparse.Namespace) -> int:
    from chatmaild.admin.main import config_from_args

    config = config_from_args(args)
    checks = status(config, args)
    healthy = all(c.ok for c in checks)
    if args.json:
        json.dump(
            {"mail_domain": config.mail_domain, "healthy": healthy,
             "checks": [asdict(c) for c in checks]},
            sys.stdout, indent=2,
        )  # fmt: skip
        print()
    else:
        problems = sum(not c.ok for c in checks)
        state = "healthy" if healthy else f"{problems} problem(s)"
        print(f"chatmail relay {config.mail_domain}: {state}")
        for c in checks:
            print(f"  {'ok' if c.ok else 'PROBLEM':8} {c.name:12} {c.detail}")
    return 0 if healthy else 1


def add_cli(subparsers) -> None:
    from chatmaild.admin.main import _subparser

    p = _subparser(subparsers, "status", STATUS_DOC, cmd_status)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-units", action="store_true", help="skip the systemd checks")
    p.add_argument("--postfix-config", metavar="DIR", help="Postfix's config directory")
    p.add_argument("--cert-min-days", type=int, default=7, metavar="N")
    p.add_argument("--queue-max-age", type=float, default=3600.0, metavar="SECONDS")
    p.add_argument("--queue-max", type=int, default=1000, metavar="N")
    p.add_argument("--disk-max-percent", type=float, default=90.0, metavar="P")
    p.add_argument("--push-max", type=int, default=1000, metavar="N")
    p.add_argument(
        "--dns",
        action="store_true",
        help="also ask DNS for every record `chatmaild dns` prints (dns --check)",
    )
    p.add_argument("--resolver", metavar="HOST[:PORT]",
                   help="with --dns: the DNS server to ask (default: the system's)")  # fmt: skip
