"""Delta Chat exchange against an installed relay on this network namespace's 127.0.0.1.

    python -m tests.deb_client WORKDIR MAIL_DOMAIN

Run by tests/test_deb.py in a booted machine's network namespace (the host's
Python and Delta Chat core): two accounts from ``/new`` on port 443, each logged
in (which creates it), alice on IMAP 993 and SMTP 465, bob on port 443 alone
(ALPN imap/smtp, passed on to Dovecot and Postfix), a Secure-Join, then a
message each way through filtermail -> delivery; both arrive encrypted.  Prints
``exchange ok ADDR1 ADDR2``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from testing.dcclient import DCClients, securejoin, wait_incoming_text
from tests.deb_load import new_credentials

HOST = "127.0.0.1"


class InstalledRelay:
    """What DCClients needs of a relay: where it listens and fresh credentials."""

    host = HOST
    ports = {"imaps": 993, "submissions": 465, "newemail": 443}

    def __init__(self, mail_domain: str) -> None:
        self.mail_domain = mail_domain

    def new_credentials(self) -> tuple[str, str]:
        """From POST /new on 443, as the apps get them (self-signed certificate)."""
        return new_credentials(self.mail_domain)


def main(workdir: str, mail_domain: str) -> int:
    relay = InstalledRelay(mail_domain)
    clients = DCClients(Path(workdir))
    try:
        alice = clients.account(relay, name="alice")
        bob = clients.account(relay, name="bob", port443=True)
        securejoin(alice, bob, timeout=90)
        for sender, receiver, text in ((alice, bob, "hello bob"), (bob, alice, "hi alice")):
            sender.create_chat(receiver).send_text(text)
            snap = wait_incoming_text(receiver, text, timeout=90)
            if not snap.show_padlock:
                raise RuntimeError(f"{text!r} arrived unencrypted")
        print(f"exchange ok {alice.addr} {bob.addr}", flush=True)
        return 0
    finally:
        clients.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
