"""remove expired mail, inactive accounts and over-quota mail (daily)

Walks ``mailboxes_dir`` once (see chatmaild.expire.maildir) and, per account directory:

  1. removes the whole account if its last login (the mtime of its
     ``password`` file) is older than delete_inactive_users_after days;
  2. otherwise deletes messages (``cur``, ``new`` and ``tmp`` of every folder)
     whose file mtime is older than delete_mails_after days, and fetched
     messages (in ``cur``) larger than large_message_size older than
     delete_large_after days;
  3. then deletes the oldest messages (by the delivery time in Dovecot's file
     name, sizes from ``S=``) until ``cur``/``new`` of all folders together
     hold at most 70% of max_mailbox_size -- never a message younger than
     24 hours, so the client still sees the quota signal;
  4. removes ``maildirsize`` if anything was deleted, so Dovecot recounts.

Directories without a password file (policy): an empty directory, or one
holding only what an interrupted account creation leaves (``enforceE2EEincoming``,
``password.tmp-*``, an older version's ``password.lock``), is removed once nothing in it
changed for 24 hours -- under the account's creation lock, so a creation in
progress is never disturbed; any other one is removed whole (also under that
lock) when nothing in it (files or directories) changed for
delete_inactive_users_after days, because no login can ever be recorded for
it; otherwise rules 2-4 apply to it like to any account.  In an account,
``password.tmp-*`` files older than 24 hours (an interrupted password write)
are removed under the same lock.  A ``password`` that
is a symlink or directory makes the account untouchable by rule 1.  Symlinks
are never followed; names that are not account names are left alone, except
``.deleting-*`` directories (an interrupted removal), which are finished.

Without --remove this is a dry run that only reports.  Only one --remove run
works at a time (a lock on mailboxes_dir); a second one says so and exits 0.
The last line is

  expire: removed M of N mailboxes and F of T messages (B bytes) in S seconds

(``expire: dry run, would remove ...`` without --remove).

EXIT STATUS
  0 success, 1 some mailboxes could not be processed (see the log),
  78 configuration error.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from chatmaild.common import accountlock, metrics
from chatmaild.common.config import Config
from chatmaild.common.service import load_config_or_exit, make_parser, setup_logging
from chatmaild.expire.maildir import (
    DAY,
    PASSWORD,
    MailboxScan,
    Message,
    iter_mailboxes,
    list_root,
    open_dir,
    open_root,
    prom_escape,
    remove_account,
    remove_maildirsize,
    remove_trash,
    unlink_messages,
    write_textfile,
)

PROG = "chatmail-expire"
QUOTA_TARGET_RATIO = 0.70  # relieve down to 70%; Dovecot's quota_warning fires at 75%
PROTECT_SECONDS = DAY  # mail younger than this is never deleted for quota
QUOTA_FROM_CONFIG = -1  # Policy.from_config: take the quota target from max_mailbox_size

# reasons, used in logs and metric labels
OLD, LARGE, QUOTA, IN_MAILBOX = "old", "large", "quota", "mailbox"
INACTIVE, EMPTY, ABANDONED = "inactive", "empty", "abandoned"
INCOMPLETE = "incomplete"  # only the leftovers of an interrupted account creation
MESSAGE_REASONS = (OLD, LARGE, QUOTA, IN_MAILBOX)
MAILBOX_REASONS = (INACTIVE, EMPTY, INCOMPLETE, ABANDONED)

log = logging.getLogger(PROG)


# ---------------------------------------------------------------- pure policy


@dataclass(frozen=True)
class Policy:
    """Cut-off times for one run; ``now`` is real UTC epoch seconds (possibly shifted)."""

    now: float
    delete_mails_after: int  # days
    delete_large_after: int  # days
    delete_inactive_users_after: int  # days
    large_message_size: int  # bytes
    quota_target: int | None  # bytes of cur/new to relieve down to; None: no quota relief

    @classmethod
    def from_config(
        cls, config: Config, now: float, quota_target: int | None = QUOTA_FROM_CONFIG
    ) -> Policy:
        """The config's rules; the quota target defaults to 70% of max_mailbox_size."""
        if quota_target == QUOTA_FROM_CONFIG:
            quota_target = int(config.max_mailbox_size * QUOTA_TARGET_RATIO)
        return cls(
            now=now,
            delete_mails_after=config.delete_mails_after,
            delete_large_after=config.delete_large_after,
            delete_inactive_users_after=config.delete_inactive_users_after,
            large_message_size=config.large_message_size,
            quota_target=quota_target,
        )

    @property
    def mails_cutoff(self) -> float:
        return self.now - self.delete_mails_after * DAY

    @property
    def large_cutoff(self) -> float:
        return self.now - self.delete_large_after * DAY

    @property
    def inactive_cutoff(self) -> float:
        return self.now - self.delete_inactive_users_after * DAY

    @property
    def protect_from(self) -> float:
        return self.now - PROTECT_SECONDS


@dataclass
class MailboxPlan:
    """What to do with one mailbox: remove it whole, or delete some messages."""

    name: str
    remove_reason: str | None = None
    deletions: list[tuple[Message, str]] = field(default_factory=list)
    stale_temps: list[str] = field(default_factory=list)  # password.tmp-* to remove
    quota_before: int = 0  # S= bytes in cur/new of all folders
    quota_after: int = 0


def plan_mailbox(scan: MailboxScan, policy: Policy, *, whole: bool = True) -> MailboxPlan:
    """Decide, without touching the disk, what expiry does to one scanned mailbox.

    ``whole=False`` never removes the account itself (quota-expire).
    """
    plan = MailboxPlan(scan.name)
    if whole:
        if scan.password_mtime is not None:
            if scan.password_mtime < policy.inactive_cutoff:
                plan.remove_reason = INACTIVE
                return plan
        elif not scan.has_password:
            if scan.is_empty:
                # a younger empty directory may be an account being created right now
                if scan.dir_mtime < policy.protect_from:
                    plan.remove_reason = EMPTY
                return plan
            if scan.only_creation_leftovers:
                # an account creation that was killed; a younger one may still be running
                if scan.newest_mtime < policy.protect_from:
                    plan.remove_reason = INCOMPLETE
                return plan
            if scan.newest_mtime < policy.inactive_cutoff:
                plan.remove_reason = ABANDONED
                return plan
        if scan.has_password:
            plan.stale_temps = [
                n for n, mtime in scan.password_temps if mtime < policy.protect_from
            ]

    mails_cutoff = policy.mails_cutoff
    large_cutoff = policy.large_cutoff
    large_size = policy.large_message_size
    deletions = plan.deletions
    counted: list[Message] = []  # what Dovecot's maildir quota counts: cur/ and new/
    for msg in scan.messages:
        if msg.kind != "tmp":
            plan.quota_before += msg.size
        if msg.mtime < mails_cutoff:
            deletions.append((msg, OLD))
        elif msg.kind == "cur" and msg.size > large_size and msg.mtime < large_cutoff:
            deletions.append((msg, LARGE))
        elif msg.kind != "tmp":
            counted.append(msg)
    total = sum(msg.size for msg in counted)
    target = policy.quota_target
    if target is not None and total > target:
        protect_from = policy.protect_from
        counted.sort(key=lambda m: (m.ts, m.name))
        for msg in counted:
            if total <= target or msg.ts >= protect_from:
                break  # sorted by delivery time: everything after is younger still
            if msg.mtime >= protect_from:
                continue  # written within 24 h under an older name (e.g. restored): keep
            deletions.append((msg, QUOTA))
            total -= msg.size
    plan.quota_after = total
    return plan


# ---------------------------------------------------------------- acting


@dataclass
class Totals:
    mailboxes: int = 0
    messages: int = 0
    removed_mailboxes: collections.Counter = field(default_factory=collections.Counter)
    removed_messages: collections.Counter = field(default_factory=collections.Counter)
    removed_bytes: int = 0
    trash_finished: int = 0
    skipped_symlinks: int = 0
    errors: int = 0
    seconds: float = 0.0
    busy: bool = False  # another removing run holds the lock

    def summary(self, remove: bool) -> str:
        if self.busy:
            return "expire: another chatmail-expire --remove is running, nothing done"
        verb = "removed" if remove else "dry run, would remove"
        return (
            f"expire: {verb} {sum(self.removed_mailboxes.values())} of {self.mailboxes} "
            f"mailboxes and {sum(self.removed_messages.values())} of {self.messages} messages "
            f"({self.removed_bytes} bytes) in {self.seconds:.2f} seconds"
        )


def _still_removable(root_fd: int, plan: MailboxPlan, policy: Policy) -> bool:
    """Re-check right before removing: a login or a new password may have come in."""
    try:
        with open_dir(root_fd, (plan.name,)) as fd:
            try:
                st = os.stat(PASSWORD, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return plan.remove_reason in (EMPTY, INCOMPLETE, ABANDONED)
            if plan.remove_reason == INACTIVE:
                return st.st_mtime < policy.inactive_cutoff
            return st.st_size == 0  # a password appeared: it is an account now
    except OSError:
        return False


def _remove_without_password(root_fd: int, name: str) -> bool:
    """Remove a password-less directory under the account's creation lock.

    A creation holding the lock is left alone; one that starts waiting on the
    lock meanwhile finds the directory gone and makes it anew.
    """
    try:
        with open_dir(root_fd, (name,)) as fd:
            if not accountlock.acquire(fd, 0):  # held until open_dir closes fd
                log.info("%s: an account creation holds it, not removed", name)
                return False
            try:
                st = os.stat(PASSWORD, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if st.st_size > 0 or not stat.S_ISREG(st.st_mode):
                    log.info("%s: became an account during the run, not removed", name)
                    return False
            return remove_account(root_fd, name)
    except FileNotFoundError:
        return False


def _remove_stale_temps(root_fd: int, plan: MailboxPlan) -> None:
    """Unlink an account's old password.tmp-* files under its lock (skipped while busy)."""
    try:
        with open_dir(root_fd, (plan.name,)) as fd:
            if not accountlock.acquire(fd, 0):  # held until open_dir closes fd
                return  # a password write is running: its own cleanup takes them
            for tmp in plan.stale_temps:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=fd)
                    log.info("%s: removed stale %s", plan.name, tmp)
    except FileNotFoundError:
        return


def apply_plan(
    root_fd: int,
    scan: MailboxScan,
    plan: MailboxPlan,
    policy: Policy,
    totals: Totals,
    *,
    remove: bool,
) -> int:
    """Carry out (or with ``remove=False`` only count) a plan; returns messages removed."""
    name = plan.name
    if plan.stale_temps:
        if remove:
            _remove_stale_temps(root_fd, plan)
        else:
            log.info("would remove stale %s from %s", ", ".join(plan.stale_temps), name)
    if plan.remove_reason:
        if remove:
            if not _still_removable(root_fd, plan, policy):
                log.info("%s: changed during the run, not removed", name)
                return 0
            if plan.remove_reason == EMPTY:
                try:
                    os.rmdir(name, dir_fd=root_fd)  # fails if something was just created
                except OSError as e:
                    log.info("%s: not removed: %s", name, e.strerror)
                    return 0
            elif plan.remove_reason in (INCOMPLETE, ABANDONED):
                if not _remove_without_password(root_fd, name):
                    return 0
            elif not remove_account(root_fd, name):
                return 0
        totals.removed_mailboxes[plan.remove_reason] += 1
        totals.removed_messages[IN_MAILBOX] += len(scan.messages)
        totals.removed_bytes += sum(m.size for m in scan.messages)
        log.debug(
            "%s mailbox %s (%s, %d messages)",
            "removed" if remove else "would remove",
            name,
            plan.remove_reason,
            len(scan.messages),
        )
        return len(scan.messages)
    if not plan.deletions:
        return 0
    by_reason: dict[str, list[Message]] = collections.defaultdict(list)
    for msg, reason in plan.deletions:
        by_reason[reason].append(msg)
    removed = 0
    for reason, msgs in by_reason.items():
        if remove:
            result = unlink_messages(root_fd, name, msgs)
            files, size = result.files, result.size
            for error in result.errors:
                log.error("cannot remove %s", error)
            totals.errors += len(result.errors)
        else:
            files, size = len(msgs), sum(m.size for m in msgs)
        totals.removed_messages[reason] += files
        totals.removed_bytes += size
        removed += files
    if remove and removed:
        remove_maildirsize(root_fd, name)
    log.debug(
        "%s %d message(s) from %s (%s)",
        "removed" if remove else "would remove",
        removed,
        name,
        ", ".join(f"{r}={len(m)}" for r, m in sorted(by_reason.items())),
    )
    return removed


def expire_tree(
    mailboxes_dir: str, policy: Policy, *, remove: bool, maxnum: int | None = None
) -> Totals:
    """One pass over ``mailboxes_dir``; never raises for a single broken mailbox."""
    start = time.monotonic()
    totals = Totals()
    try:
        root_fd = open_root(mailboxes_dir)
    except FileNotFoundError:
        log.warning("%s does not exist; nothing to expire", mailboxes_dir)
        return totals
    try:
        if remove:
            # one removing run at a time (timer and a manual run); a lock on the
            # directory itself needs no extra file and dies with the process
            try:
                fcntl.flock(root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                totals.busy = True
                return totals
        names, trash, totals.skipped_symlinks = list_root(root_fd)
        for leftover in trash:
            if remove:
                try:
                    remove_trash(root_fd, leftover)
                except OSError as e:
                    totals.errors += 1
                    log.error("cannot finish removing %s: %s", leftover, e)
                    continue
            totals.trash_finished += 1
            log.info(
                "%s interrupted removal %s", "finished" if remove else "would finish", leftover
            )
        if totals.skipped_symlinks:
            log.warning("skipped %d symlink(s) in %s", totals.skipped_symlinks, mailboxes_dir)
        if maxnum is not None:
            names = names[:maxnum]
        for name, scan, error in iter_mailboxes(root_fd, names):
            if error is not None:
                totals.errors += 1
                log.error("%s: cannot scan: %s", name, error)
                continue
            if scan is None:
                continue  # vanished since the listing
            totals.mailboxes += 1
            totals.messages += len(scan.messages)
            totals.errors += scan.errors
            try:
                apply_plan(root_fd, scan, plan_mailbox(scan, policy), policy, totals, remove=remove)
            except OSError as e:
                totals.errors += 1
                log.error("%s: %s", name, e)
    finally:
        os.close(root_fd)
    totals.seconds = time.monotonic() - start
    return totals


# ---------------------------------------------------------------- metrics


def prometheus_text(totals: Totals, *, remove: bool, now: float) -> str:
    lines: list[str] = []

    def metric(name: str, help_: str, samples: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    metric(
        "chatmail_expire_last_run_timestamp_seconds",
        "end of the last expire run",
        [("", round(now, 3))],
    )
    metric("chatmail_expire_dry_run", "1 if the last run only reported", [("", int(not remove))])
    metric(
        "chatmail_expire_duration_seconds",
        "duration of the last run",
        [("", round(totals.seconds, 3))],
    )
    metric("chatmail_expire_mailboxes", "mailboxes scanned", [("", totals.mailboxes)])
    metric("chatmail_expire_messages", "messages scanned", [("", totals.messages)])
    metric(
        "chatmail_expire_removed_mailboxes",
        "mailboxes removed by reason",
        [(f'{{reason="{prom_escape(r)}"}}', totals.removed_mailboxes[r]) for r in MAILBOX_REASONS],
    )
    metric(
        "chatmail_expire_removed_messages",
        "messages removed by reason (mailbox: inside removed mailboxes)",
        [(f'{{reason="{prom_escape(r)}"}}', totals.removed_messages[r]) for r in MESSAGE_REASONS],
    )
    metric(
        "chatmail_expire_removed_bytes",
        "S= bytes of removed messages",
        [("", totals.removed_bytes)],
    )
    metric(
        "chatmail_expire_errors",
        "mailboxes or directories that could not be processed",
        [("", totals.errors)],
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, __doc__)
    parser.add_argument(
        "ini", nargs="?", help="chatmail.ini (same as --config; kept for the reference CLI)"
    )
    parser.add_argument(
        "--remove", action="store_true", help="really delete (default: dry run, report only)"
    )
    parser.add_argument(
        "--days",
        type=int,
        default=0,
        metavar="N",
        help="pretend now is N days earlier (negative: later) than the real UTC time",
    )
    parser.add_argument(
        "--maxnum", type=int, metavar="N", help="only look at the first N mailboxes (by name)"
    )
    parser.add_argument(
        "--textfile",
        metavar="PATH",
        help="also write Prometheus metrics to PATH (a directory gets expire.prom)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(PROG, verbose=args.verbose)
    config = load_config_or_exit(args.ini or args.config, PROG)
    # time.time() is UTC epoch seconds regardless of the host's time zone
    now = time.time() - args.days * DAY
    policy = Policy.from_config(config, now)
    totals = expire_tree(config.mailboxes_dir, policy, remove=args.remove, maxnum=args.maxnum)
    print(totals.summary(args.remove), flush=True)
    if args.remove and metrics.configure(config.metrics_address, config.metrics_dir, PROG):
        metrics.EXPIRE_REMOVED.labels("mailboxes").inc(sum(totals.removed_mailboxes.values()))
        metrics.EXPIRE_REMOVED.labels("messages").inc(sum(totals.removed_messages.values()))
    if args.textfile and not totals.busy:  # the running one will write its figures
        try:
            write_textfile(
                args.textfile,
                "expire.prom",
                prometheus_text(totals, remove=args.remove, now=time.time()),
            )
        except OSError as e:
            log.error("cannot write %s: %s", args.textfile, e)
            return 1
    return 1 if totals.errors else 0


if __name__ == "__main__":
    sys.exit(main())
