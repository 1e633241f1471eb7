"""relieve one mailbox that crossed its quota warning (run by Dovecot)

Usage: chatmail-quota-expire [--config INI] TARGET_MB MAILBOX_PATH

Dovecot's quota_warning (at 75% of the quota) runs this through the
``quota-warning`` script service as the mail user.  It applies the same
message rules as chatmail-expire to MAILBOX_PATH: messages older than
delete_mails_after days, fetched large messages older than delete_large_after
days, then the oldest messages (by delivery time in the file name, ``S=``
sizes, cur/ and new/ of all folders) until at most TARGET_MB MiB remain --
never a message younger than 24 hours.  The account itself is never removed.

If anything was removed, ``maildirsize`` is deleted so Dovecot recounts, and

  quota-expire: removed N message(s) from <mailbox name>

is printed to stderr (Dovecot logs it; mtail counts it).

MAILBOX_PATH must be a directory directly inside mailboxes_dir with an
account-like name; anything else is refused (and logged).

EXIT STATUS
  always 0: a failure here must never make Dovecot fail a delivery.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from chatmaild.common import metrics
from chatmaild.common.addr import is_safe_dirname
from chatmaild.common.config import ConfigError, read_config
from chatmaild.common.service import make_parser, setup_logging
from chatmaild.expire.maildir import open_root, scan_mailbox
from chatmaild.expire.main import Policy, Totals, apply_plan, plan_mailbox

PROG = "quota-expire"
log = logging.getLogger(PROG)


def mailbox_name(mailboxes_dir: str, mailbox_path: str) -> str | None:
    """The account name if ``mailbox_path`` is ``<mailboxes_dir>/<name>``, else None.

    Both sides are resolved, so ``..`` tricks or a symlinked parent cannot point
    elsewhere; the mailbox itself is later opened with O_NOFOLLOW.
    """
    path = os.path.normpath(mailbox_path)
    name = os.path.basename(path)
    if not is_safe_dirname(name):
        return None
    parent = os.path.realpath(os.path.dirname(path))
    if parent != os.path.realpath(mailboxes_dir):
        return None
    return name


def relieve(mailboxes_dir: str, name: str, policy: Policy) -> int:
    """Apply the message rules to one mailbox; returns messages removed."""
    root_fd = open_root(mailboxes_dir)
    try:
        scan = scan_mailbox(root_fd, name)
        if scan is None:
            log.warning("%s: no such mailbox directory", name)
            return 0
        plan = plan_mailbox(scan, policy, whole=False)
        return apply_plan(root_fd, scan, plan, policy, Totals(), remove=True)
    finally:
        os.close(root_fd)


def run(argv: list[str] | None) -> None:
    parser = make_parser("chatmail-quota-expire", __doc__)
    parser.add_argument("target_mb", type=int, help="relieve down to this many MiB")
    parser.add_argument("mailbox_path", help="the mailbox directory, <mailboxes_dir>/<address>")
    args = parser.parse_args(argv)
    setup_logging(PROG, verbose=args.verbose)
    try:
        config = read_config(args.config)
    except ConfigError as e:
        log.error("%s", e)
        return
    name = mailbox_name(config.mailboxes_dir, args.mailbox_path)
    if name is None:
        log.error(
            "refusing %s: not a mailbox directly in %s", args.mailbox_path, config.mailboxes_dir
        )
        return
    if args.target_mb < 0:
        log.error("refusing negative target %d MiB", args.target_mb)
        return
    policy = Policy.from_config(config, time.time(), quota_target=args.target_mb * 1024 * 1024)
    removed = relieve(config.mailboxes_dir, name, policy)
    if removed and metrics.configure(config.metrics_address, config.metrics_dir, PROG):
        # Dovecot may run several at once: one at a time opens and adds to the file
        from filelock import FileLock

        with FileLock(str(Path(config.metrics_dir) / f".{PROG}.lock")):
            metrics.EXPIRE_REMOVED.labels("quota_messages").inc(removed)
    if removed:
        print(
            f"quota-expire: removed {removed} message(s) from {name}", file=sys.stderr, flush=True
        )


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except SystemExit as e:  # argparse: usage errors (--help exits 0 anyway)
        if e.code not in (0, None):
            print(
                f"quota-expire: bad arguments: {argv if argv is not None else sys.argv[1:]}",
                file=sys.stderr,
            )
    except Exception as e:  # never let Dovecot see a failure
        log.exception("quota-expire failed: %s", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
