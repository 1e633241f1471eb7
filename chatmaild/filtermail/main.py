"""OpenPGP-only before-queue SMTP filter and DKIM signer for a chatmail relay.

Usage: filtermail [--config INI] outgoing|incoming|milter

outgoing  listens on filtermail_host:filtermail_smtp_port for Postfix's
          submission proxy filter: per-sender rate limit, From must match
          the sender, only encrypted mail leaves (523 otherwise), privacy
          header cleanup, DKIM signature when a recipient is on another
          domain (nobody checks one on local mail), re-injection to
          postfix_reinject_port.
incoming  listens on filtermail_smtp_port_incoming for the port-25 proxy
          filter: encrypted mail, Secure-Join and mailer-daemon reports pass,
          cleartext only to recipients that allow it; a DKIM signature of the
          From domain must verify; re-injection to postfix_reinject_port_incoming.
milter    listens on filtermail_milter_port for Postfix non_smtpd_milters and
          DKIM-signs mail Postfix generates itself (bounces).

FILES
  dkim_key_path (PEM) is read by outgoing and milter at start.

EXIT STATUS
  0 after a graceful stop (SIGTERM), 1 if the socket cannot be bound,
  78 for a configuration error (including an unreadable DKIM key).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from ..service import EXIT_CONFIG, Daemon, Endpoint, run_daemon
from .dkim import DKIMError, KeyFetcher, Signer, Verifier
from .incoming import IncomingHandler
from .milter import MilterSession
from .outgoing import OutgoingHandler
from .reinject import ReinjectClient
from .smtp import ServerSettings, SMTPServer

MODES = ("outgoing", "incoming", "milter")


def load_signer(config) -> Signer:
    try:
        return Signer.from_file(
            config.mail_domain.strip("[]"), config.dkim_selector, config.dkim_key_path
        )
    except (OSError, DKIMError) as e:
        print(f"filtermail: cannot load DKIM key {config.dkim_key_path}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


class FilterDaemon(Daemon):
    name = "filtermail"
    mode = "outgoing"

    def endpoint(self) -> Endpoint:
        port = (
            self.config.filtermail_smtp_port
            if self.mode == "outgoing"
            else self.config.filtermail_smtp_port_incoming
        )
        return Endpoint.tcp(self.config.filtermail_host, port)

    async def start(self) -> None:
        c = self.config
        port = (
            c.postfix_reinject_port if self.mode == "outgoing" else c.postfix_reinject_port_incoming
        )
        self.reinject = ReinjectClient(c.postfix_host, port, f"[{c.filtermail_host}]")
        if self.mode == "outgoing":
            handler = OutgoingHandler(c, self.reinject, load_signer(c))
        else:
            verifier = Verifier(KeyFetcher(c.dns_resolver, timeout=c.dkim_dns_timeout))
            handler = IncomingHandler(c, self.reinject, verifier)
        self.server = SMTPServer(
            handler,
            ServerSettings(
                hostname=c.mail_domain.strip("[]"),
                max_message_size=c.max_message_size,
                idle_timeout=c.filtermail_idle_timeout,
                total_timeout=c.filtermail_session_timeout,
            ),
            busy=self.request,
        )
        self.log.info("entering serving loop (%s)", self.mode)

    async def stop(self) -> None:
        await self.reinject.close()

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self.server.serve(reader, writer)


class OutgoingDaemon(FilterDaemon):
    mode = "outgoing"


class IncomingDaemon(FilterDaemon):
    mode = "incoming"


class MilterDaemon(Daemon):
    name = "filtermail"

    def endpoint(self) -> Endpoint:
        return Endpoint.tcp(self.config.filtermail_host, self.config.filtermail_milter_port)

    async def start(self) -> None:
        self.signer = load_signer(self.config)
        self.log.info("entering serving loop (milter)")

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        c = self.config
        session = MilterSession(self.signer, c.mail_domain.strip("[]"), c.max_message_size)
        await session.serve(reader, writer)


DAEMONS: dict[str, type[Daemon]] = {
    "outgoing": OutgoingDaemon,
    "incoming": IncomingDaemon,
    "milter": MilterDaemon,
}


def _add_mode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=MODES, help="which filter to run")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    mode = next((a for a in args if a in MODES), "outgoing")
    return run_daemon(DAEMONS[mode], __doc__, args, add_arguments=_add_mode)


if __name__ == "__main__":
    raise SystemExit(main())
