"""report storage use and account activity of the mailbox tree

Walks mailboxes_dir once (read only, symlinks never followed) and prints:
bytes on disk in messages and in extra files (indexes, quota and metadata
files), the messages at or above 0, 100 KiB, 512 KiB, 1 MiB, 2 MiB, 5 MiB and
10 MiB of message size (count and size sum; the message size is Dovecot's
``S=`` value, which the quota counts, while the disk may hold it gzipped),
the number of accounts (all, CI = name starting with ``ci-``, users) and
how many non-CI accounts logged in within 1, 10, 30, 40, 80, 100 and 150
days (last login = mtime of the ``password`` file).

--min-login-age and --mdir restrict only the message figures; extra files and
account counts always cover every mailbox.

With --textfile the same figures are written as Prometheus metrics
(chatmail_storage_bytes, chatmail_messages_bytes, chatmail_messages_count,
chatmail_accounts, chatmail_accounts_active); --legacy-metrics writes the old
``accounts``/``ci_accounts``/``nonci_accounts`` gauges.  Both files are
replaced atomically with mode 0644.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from chatmaild.common.service import load_config_or_exit, make_parser, setup_logging
from chatmaild.expire.maildir import DAY, iter_mailboxes, list_root, open_root, write_textfile

PROG = "chatmail-fsreport"
KIB = 1024
MIB = 1024 * 1024
SIZE_THRESHOLDS = (0, 100 * KIB, 512 * KIB, MIB, 2 * MIB, 5 * MIB, 10 * MIB)
ACTIVE_DAYS = (1, 10, 30, 40, 80, 100, 150)
LEGACY_METRICS_PATH = "/var/www/html/metrics"
CI_PREFIX = "ci-"
LEGACY_CI_PREFIXES = ("ci-", "ac_")

log = logging.getLogger(PROG)


def is_ci(name: str) -> bool:
    return name.startswith(CI_PREFIX)


@dataclass
class Report:
    now: float
    mailboxes: int = 0
    ci_mailboxes: int = 0
    legacy_ci_mailboxes: int = 0
    message_bytes: int = 0  # bytes on disk of the messages selected by the filters
    message_count: int = 0
    extra_bytes: int = 0
    extra_files: int = 0
    # per SIZE_THRESHOLDS entry: [count, size] of selected messages at least that big,
    # by message size (Dovecot's S=, what the quota counts; on-disk size may be gzipped)
    by_size: list[list[int]] = field(default_factory=lambda: [[0, 0] for _ in SIZE_THRESHOLDS])
    active: dict[int, int] = field(default_factory=lambda: dict.fromkeys(ACTIVE_DAYS, 0))
    errors: int = 0

    @property
    def user_mailboxes(self) -> int:
        return self.mailboxes - self.ci_mailboxes

    @property
    def total_bytes(self) -> int:
        return self.message_bytes + self.extra_bytes


def collect(
    mailboxes_dir: str,
    now: float,
    *,
    min_login_age: float | None = None,
    mdir: str | None = None,
    maxnum: int | None = None,
) -> Report:
    """One pass over ``mailboxes_dir``; message figures honour the filters."""
    report = Report(now=now)
    try:
        root_fd = open_root(mailboxes_dir)
    except FileNotFoundError:
        log.warning("%s does not exist", mailboxes_dir)
        return report
    thresholds = list(enumerate(SIZE_THRESHOLDS))
    by_size = report.by_size
    try:
        names, _trash, _links = list_root(root_fd)
        if maxnum is not None:
            names = names[:maxnum]
        for name, scan, error in iter_mailboxes(root_fd, names, stat_extras=True):
            if error is not None or scan is None:
                if error is not None:
                    report.errors += 1
                    log.error("%s: cannot scan: %s", name, error)
                continue
            report.mailboxes += 1
            report.errors += scan.errors
            ci = is_ci(name)
            report.ci_mailboxes += ci
            report.legacy_ci_mailboxes += name.startswith(LEGACY_CI_PREFIXES)
            report.extra_bytes += scan.extra_bytes
            report.extra_files += scan.extra_files
            login = scan.password_mtime
            if login is not None and not ci:
                for days in ACTIVE_DAYS:
                    if login >= now - days * DAY:
                        report.active[days] += 1
            if min_login_age is not None and (login is None or login > now - min_login_age * DAY):
                continue
            for msg in scan.messages:
                if mdir is not None and msg.kind != mdir:
                    continue
                size = msg.size
                report.message_count += 1
                report.message_bytes += msg.disk_size
                for i, threshold in thresholds:
                    if size < threshold:
                        break
                    by_size[i][0] += 1
                    by_size[i][1] += size
    finally:
        os.close(root_fd)
    return report


# ---------------------------------------------------------------- output


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "  0.0%"


def format_console(report: Report, mailboxes_dir: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report.now))
    total = report.total_bytes
    lines = [
        f"storage report for {mailboxes_dir} at {when}",
        f"  total        {human(total):>12}",
        f"  messages     {human(report.message_bytes):>12} {_pct(report.message_bytes, total)}"
        f"  {report.message_count} files",
        f"  extra files  {human(report.extra_bytes):>12} {_pct(report.extra_bytes, total)}"
        f"  {report.extra_files} files",
        "messages by size (at least):",
    ]
    for threshold, (count, size) in zip(SIZE_THRESHOLDS, report.by_size, strict=True):
        lines.append(f"  >= {human(threshold):>10}  {count:>10} files  {human(size):>12}")
    lines.append(
        f"accounts: {report.mailboxes} all, {report.user_mailboxes} users, {report.ci_mailboxes} ci"
    )
    lines.append("users active within:")
    for days in ACTIVE_DAYS:
        lines.append(f"  {days:>4} days  {report.active[days]:>8}")
    return "\n".join(lines) + "\n"


def _gauge(lines: list[str], name: str, help_: str, samples: list[tuple[str, int]]) -> None:
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} gauge")
    lines.extend(f"{name}{labels} {value}" for labels, value in samples)


def prometheus_text(report: Report) -> str:
    lines: list[str] = []
    _gauge(
        lines,
        "chatmail_storage_bytes",
        "bytes on disk in the mailbox tree",
        [
            ('{kind="messages"}', report.message_bytes),
            ('{kind="extra"}', report.extra_bytes),
            ('{kind="total"}', report.total_bytes),
        ],
    )
    _gauge(
        lines,
        "chatmail_messages_bytes",
        "message size sum (as the quota counts) of messages at least min_size big",
        [
            (f'{{min_size="{t}"}}', b)
            for t, (_c, b) in zip(SIZE_THRESHOLDS, report.by_size, strict=True)
        ],
    )
    _gauge(
        lines,
        "chatmail_messages_count",
        "number of messages at least min_size bytes big",
        [
            (f'{{min_size="{t}"}}', c)
            for t, (c, _b) in zip(SIZE_THRESHOLDS, report.by_size, strict=True)
        ],
    )
    _gauge(
        lines,
        "chatmail_accounts",
        "account directories (ci: name starts with ci-)",
        [
            ('{kind="all"}', report.mailboxes),
            ('{kind="ci"}', report.ci_mailboxes),
            ('{kind="user"}', report.user_mailboxes),
        ],
    )
    _gauge(
        lines,
        "chatmail_accounts_active",
        "non-CI accounts with a login within the last N days",
        [(f'{{days="{d}"}}', report.active[d]) for d in ACTIVE_DAYS],
    )
    return "\n".join(lines) + "\n"


def legacy_text(report: Report) -> str:
    """The gauges of the reference's old metrics.py (CI there: ``ci-`` or ``ac_``)."""
    lines: list[str] = []
    ci = report.legacy_ci_mailboxes
    _gauge(lines, "accounts", "Number of accounts", [("", report.mailboxes)])
    _gauge(lines, "ci_accounts", "Number of CI accounts", [("", ci)])
    _gauge(lines, "nonci_accounts", "Number of non-CI accounts", [("", report.mailboxes - ci)])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, __doc__)
    parser.add_argument("ini", nargs="?", help="chatmail.ini (same as --config)")
    parser.add_argument(
        "--days", type=int, default=0, metavar="N", help="pretend now is N days earlier"
    )
    parser.add_argument(
        "--min-login-age",
        type=float,
        metavar="DAYS",
        help="message figures only for mailboxes whose last login is at least DAYS old",
    )
    parser.add_argument(
        "--mdir", choices=("cur", "new", "tmp"), help="message figures only for this directory"
    )
    parser.add_argument("--maxnum", type=int, metavar="N", help="only the first N mailboxes")
    parser.add_argument(
        "--textfile",
        metavar="PATH",
        help="write Prometheus metrics (a directory gets fsreport.prom)",
    )
    parser.add_argument(
        "--legacy-metrics",
        nargs="?",
        const=LEGACY_METRICS_PATH,
        metavar="FILE",
        help=f"write the old accounts gauges (default file: {LEGACY_METRICS_PATH})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(PROG, verbose=args.verbose)
    config = load_config_or_exit(args.ini or args.config, PROG)
    now = time.time() - args.days * DAY
    report = collect(
        config.mailboxes_dir,
        now,
        min_login_age=args.min_login_age,
        mdir=args.mdir,
        maxnum=args.maxnum,
    )
    sys.stdout.write(format_console(report, config.mailboxes_dir))
    sys.stdout.flush()
    status = 1 if report.errors else 0
    for path, default_name, text in (
        (args.textfile, "fsreport.prom", prometheus_text),
        (args.legacy_metrics, "metrics", legacy_text),
    ):
        if not path:
            continue
        try:
            write_textfile(path, default_name, text(report))
        except OSError as e:
            log.error("cannot write %s: %s", path, e)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
