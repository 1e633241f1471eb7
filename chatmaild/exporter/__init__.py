"""chatmail-metrics: the relay's Prometheus endpoint (``metrics_address``).

What every process that runs the role needs before it is imported (chatmail-metrics
alone, or filtermail's metrics role): its two paths and their options.
"""

from __future__ import annotations

import argparse

POSTFIX_QUEUE = "/var/spool/postfix"
# Dovecot 2.3 tells its stats HTTP listener from the others by the socket's name
# alone; dovecot.conf (chatmaild.relay.render) names it so in base_dir
DOVECOT_STATS_NAME = "http"
DOVECOT_STATS = f"/run/dovecot/{DOVECOT_STATS_NAME}"


def add_arguments(parser: argparse.ArgumentParser, role: str = "") -> None:
    """--postfix-queue and --dovecot-stats; ``role`` prefixes their help when the
    role runs in another program's process."""
    parser.add_argument(
        "--postfix-queue",
        default=POSTFIX_QUEUE,
        metavar="DIR",
        help=f"{role}Postfix's queue_directory, whose showq service lists the queue"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--dovecot-stats",
        default=DOVECOT_STATS,
        metavar="SOCKET",
        help=f"{role}the UNIX socket where Dovecot's stats service answers GET /metrics"
        " (default: %(default)s)",
    )
