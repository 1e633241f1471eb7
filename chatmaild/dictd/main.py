"""Dovecot's dict daemons in one process: doveauth, last-login and metadata.

Usage: chatmail-dict [--config INI] [ROLE ...]   (ROLE: doveauth, lastlogin, metadata;
default all three)

Each role is the daemon of the same name (see doveauth(1), chatmail-lastlogin(1),
chatmail-metadata(1)) with its own config keys and socket, and logs under its
own name (doveauth, chatmail-lastlogin, chatmail-metadata).  Serving them from
one process keeps one interpreter and one set of libraries in memory instead
of three.  A failing request closes that connection only; the other roles keep
serving.  All three run as the vmail user and write below the mailboxes
directory; metadata also sends push notifications over the network.

EXIT STATUS
  0 after a graceful stop (SIGTERM), 1 if a socket cannot be bound,
  78 for a configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from chatmaild.common.service import Daemon, run_daemons

# role -> (module, Daemon class); a role's module is imported only when it runs
ROLES = {
    "doveauth": ("chatmaild.dictd.doveauth", "DoveauthDaemon"),
    "lastlogin": ("chatmaild.dictd.lastlogin", "LastLoginDaemon"),
    "metadata": ("chatmaild.dictd.metadata", "MetadataDaemon"),
}


def _add_roles(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "roles",
        nargs="*",
        metavar="ROLE",
        help="roles (default: all): " + ", ".join(ROLES),
    )


def roles_of(args: argparse.Namespace) -> list[type[Daemon]]:
    names = list(dict.fromkeys(args.roles or ROLES))
    unknown = [n for n in names if n not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (choose from {', '.join(ROLES)})")
    classes = []
    for name in names:
        module, cls = ROLES[name]
        classes.append(getattr(importlib.import_module(module), cls))
    return classes


def main(argv: list[str] | None = None) -> int:
    return run_daemons("chatmail-dict", roles_of, __doc__, argv, add_arguments=_add_roles)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
