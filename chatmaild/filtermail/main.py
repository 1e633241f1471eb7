"""OpenPGP-only before-queue SMTP filter and DKIM signer for a chatmail relay.

Usage: filtermail [--config INI] [--routes FILE] ROLE [ROLE ...]
       (ROLE: outgoing, incoming, milter, transport)

One process serves every role named (the installed unit runs all three),
each on its own socket with its own config keys; its log lines are tagged
with the role (filtermail, filtermail-incoming, filtermail-milter,
filtermail-transport).  A
failing request closes that connection only; the other roles keep serving.
The web front door is chatmail-newemail(1), a process of its own: nothing a
client of the public web port does can take time from the filters' event
loop (README, "The web port").

outgoing  listens on filtermail_smtp_socket for Postfix's submission proxy
          filter: per-sender rate limit, From must match the sender, only
          encrypted mail leaves (523 otherwise), privacy header cleanup, DKIM
          signature when a recipient is on another domain (nobody checks one
          on local mail), re-injection to postfix_reinject_socket.
incoming  listens on filtermail_smtp_socket_incoming for the port-25 proxy
          filter: encrypted mail, Secure-Join and mailer-daemon reports pass,
          cleartext only to recipients that allow it; a DKIM signature of the
          From domain must verify; re-injection to
          postfix_reinject_socket_incoming.
milter    listens on filtermail_milter_socket for Postfix non_smtpd_milters and
          DKIM-signs mail Postfix generates itself (bounces).
transport listens on filtermail_transport_socket for LMTP from Postfix's
          default_transport (mxdeliv) and delivers mail for other domains:
          POST https://<mx host>/mxdeliv first (unless mxdeliv_send = no),
          then SMTP to port 25, STARTTLS required, certificates checked
          against the MX name; each recipient's reply tells Postfix whether
          the message was delivered, bounces, or stays in its queue.
          --routes FILE (make run): lines "domain address smtp_port
          https_port" are the only destinations.

SOCKETS
  Every endpoint is a UNIX socket, so that its permissions decide who may
  connect: filtermail's own sockets are created mode 0660 in a directory
  owned by vmail, group postfix, setgid (the sockets inherit group postfix:
  only Postfix connects); Postfix's re-injection services live in its
  public/ directory, reachable by the postdrop group, which filtermail
  outgoing and incoming get as a supplementary group.

FILES
  dkim_key_path (PEM) is read by outgoing and milter at start.

EXIT STATUS
  0 after a graceful stop (SIGTERM), 1 if the socket cannot be bound,
  78 for a configuration error (including an unreadable DKIM key).
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import os
import socket
import stat
import sys
from pathlib import Path

from chatmaild import exporter
from chatmaild.common.service import EXIT_CONFIG, Daemon, Endpoint, run_daemons
from chatmaild.filtermail.dkim import DKIMError, KeyFetcher, Signer, Verifier
from chatmaild.filtermail.incoming import IncomingHandler
from chatmaild.filtermail.milter import MilterSession
from chatmaild.filtermail.outgoing import OutgoingHandler
from chatmaild.filtermail.reinject import ReinjectClient
from chatmaild.filtermail.smtp import ServerSettings, SMTPServer
from chatmaild.filtermail.transport import Routes, TransportHandler

# owner vmail (filtermail) and the directory's group postfix; nobody else
POSTFIX_CLIENT_MODE = 0o660

MODES = ("outgoing", "incoming", "milter", "transport")


def postfix_access_problem(path: str, postfix_gid: int) -> str | None:
    """Why Postfix (running with group ``postfix_gid``) could not connect to the
    socket at ``path``, or None.  Not fatal: mail is only deferred meanwhile."""
    sock, parent = os.stat(path), os.stat(os.path.dirname(path))
    socket_ok = sock.st_gid == postfix_gid and sock.st_mode & 0o060 == 0o060
    parent_ok = parent.st_mode & 0o001 or (parent.st_gid == postfix_gid and parent.st_mode & 0o010)
    if socket_ok and parent_ok:
        return None
    return (
        f"Postfix cannot connect to {path} (socket group id {sock.st_gid}, mode"
        f" {stat.S_IMODE(sock.st_mode):o}; directory group id {parent.st_gid}, mode"
        f" {stat.S_IMODE(parent.st_mode):o}): the directory must be setgid with group postfix,"
        " e.g. install -d -o vmail -g postfix -m 2750 DIR"
    )


def warn_unless_postfix_can_connect(daemon: Daemon) -> None:
    listen = getattr(daemon.args, "listen", None) or []
    if any("=" not in v or v.partition("=")[0] == daemon.name for v in listen):
        return  # an explicit --listen is the operator's choice
    path = daemon.endpoint().path
    try:
        problem = postfix_access_problem(path, grp.getgrnam("postfix").gr_gid) if path else None
    except (KeyError, OSError):
        return  # no postfix group here, or a socket passed by systemd elsewhere
    if problem:
        daemon.log.warning("%s", problem)


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

    incoming: IncomingHandler | None = None

    def endpoint(self) -> Endpoint:
        c = self.config
        outgoing = self.mode == "outgoing"
        # group postfix (the setgid directory's): Postfix's smtpd is the one client
        path = c.filtermail_smtp_socket if outgoing else c.filtermail_smtp_socket_incoming
        return Endpoint.unix(path, mode=POSTFIX_CLIENT_MODE)

    async def start(self) -> None:
        c = self.config
        outgoing = self.mode == "outgoing"
        self.reinject = ReinjectClient(
            c.postfix_reinject_socket if outgoing else c.postfix_reinject_socket_incoming
        )
        warn_unless_postfix_can_connect(self)
        if self.mode == "outgoing":
            handler = OutgoingHandler(c, self.reinject, load_signer(c))
        else:
            verifier = Verifier(KeyFetcher(c.dns_resolver, timeout=c.dkim_dns_timeout))
            handler = IncomingHandler(c, self.reinject, verifier)
            self.incoming = handler
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
        if self.incoming is not None:
            self.incoming.close()  # its held-back log summary
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
    name = "filtermail-incoming"
    mode = "incoming"


class MilterDaemon(Daemon):
    name = "filtermail-milter"

    def endpoint(self) -> Endpoint:
        # group postfix (the setgid directory's): Postfix's cleanup is the one client
        return Endpoint.unix(self.config.filtermail_milter_socket, mode=POSTFIX_CLIENT_MODE)

    async def start(self) -> None:
        self.signer = load_signer(self.config)
        warn_unless_postfix_can_connect(self)
        self.log.info("entering serving loop (milter)")

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        c = self.config
        session = MilterSession(self.signer, c.mail_domain.strip("[]"), c.max_message_size)
        await session.serve(reader, writer)


class TransportDaemon(Daemon):
    name = "filtermail-transport"

    def endpoint(self) -> Endpoint:
        # group postfix (the setgid directory's): Postfix's lmtp client is the one client
        return Endpoint.unix(self.config.filtermail_transport_socket, mode=POSTFIX_CLIENT_MODE)

    async def start(self) -> None:
        c = self.config
        routes_file = getattr(self.args, "routes", None)
        routes = Routes(Path(routes_file)) if routes_file else None
        self.handler = TransportHandler(c, routes)
        self.server = SMTPServer(
            self.handler,
            ServerSettings(
                hostname=c.mail_domain.strip("[]"),
                max_message_size=c.max_message_size,
                idle_timeout=c.filtermail_idle_timeout,
                total_timeout=c.filtermail_session_timeout,
                lmtp=True,
            ),
            busy=self.request,
        )
        warn_unless_postfix_can_connect(self)
        self.log.info("entering serving loop (transport)")

    async def stop(self) -> None:
        await self.handler.close()

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self.server.serve(reader, writer)


DAEMONS: dict[str, type[Daemon]] = {
    "outgoing": OutgoingDaemon,
    "incoming": IncomingDaemon,
    "milter": MilterDaemon,
    "transport": TransportDaemon,
}


def _add_mode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="*", metavar="ROLE", help="roles: " + ", ".join(MODES))
    parser.add_argument(
        "--routes",
        metavar="FILE",
        help="transport: the only destinations, lines 'domain address smtp_port https_port'"
        " (make run's peers)",
    )
    exporter.add_arguments(parser, role="metrics: ")


def roles_of(args: argparse.Namespace) -> list[type[Daemon]]:
    modes = list(dict.fromkeys(args.mode or ["outgoing"]))  # none named: outgoing, as before
    if "newemail" in modes:
        # the role of earlier versions: the web front door is a process of its own now
        raise ValueError("newemail is no role of filtermail: run chatmail-newemail")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (choose from {', '.join(MODES)})")
    return [DAEMONS[mode] for mode in modes]


def config_roles(config, args: argparse.Namespace) -> list[type[Daemon]]:
    """The metrics endpoint while metrics_address is set: this process already may
    ask Postfix's showq (group postdrop), and one of its own would cost an
    interpreter (README, "Memory")."""
    if not config.metrics_address:
        return []
    from chatmaild.exporter.main import MetricsDaemon

    return [MetricsDaemon]


def main(argv: list[str] | None = None) -> int:
    return run_daemons("filtermail", roles_of, __doc__, argv, _add_mode, config_roles)


if __name__ == "__main__":
    raise SystemExit(main())
