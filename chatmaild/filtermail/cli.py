"""``chatmaild dkim-keygen``: create the relay's DKIM key and print its DNS record."""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from pathlib import Path

from chatmaild.common.accounts import atomic_write
from chatmaild.filtermail.dkim import DKIMError, Signer, generate_key, public_value, txt_record

KEYGEN_DOC = """Generate the DKIM signing key and print the DNS TXT record.

Writes a 2048-bit RSA key to dkim_key_path (mode 0640, group of vmail_user, so
filtermail can read it) unless a key is already there, and prints the TXT
record to publish at <dkim_selector>._domainkey.<mail_domain>.  With an
existing key only the record is printed; --force replaces the key (publish
the new record first, or signatures fail until DNS has it).
"""


def zone_line(name: str, record: str) -> str:
    """A zone-file line; the record is split into <=255 character strings."""
    parts = [record[i : i + 255] for i in range(0, len(record), 255)]
    return f"{name}. 3600 IN TXT " + " ".join(f'"{p}"' for p in parts)


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from chatmaild.admin.main import config_from_args

    config = config_from_args(args)
    path = Path(args.key_path or config.dkim_key_path)
    selector = args.selector or config.dkim_selector
    domain = config.mail_domain.strip("[]")
    if path.exists() and not args.force:
        pem = path.read_bytes()
        print(f"# using the existing key {path}", file=sys.stderr)
    else:
        pem, _ = generate_key(args.bits)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, pem, mode=0o640)
        if os.geteuid() == 0:
            try:
                os.chown(path, 0, pwd.getpwnam(config.vmail_user).pw_gid)
            except KeyError:
                print(f"# user {config.vmail_user} not found; key left root-only", file=sys.stderr)
        print(f"# wrote {path}", file=sys.stderr)
    try:
        Signer(domain, selector, pem)  # fails early on a key filtermail could not use
        value = public_value(pem)
    except (DKIMError, ValueError, TypeError) as e:
        print(f"chatmaild: {path}: not a usable DKIM key: {e}", file=sys.stderr)
        return 1
    print(zone_line(f"{selector}._domainkey.{domain}", txt_record(value)))
    return 0


def add_cli(subparsers) -> None:
    summary, _, body = KEYGEN_DOC.partition("\n")
    p = subparsers.add_parser(
        "dkim-keygen",
        help=summary,
        description=KEYGEN_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--selector", help="DKIM selector (default: dkim_selector)")
    p.add_argument("--key-path", metavar="PATH", help="key file (default: dkim_key_path)")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_dkim_keygen)
