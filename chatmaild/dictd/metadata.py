"""IMAP METADATA dict for Dovecot: push tokens, new-mail events and server keys.

Dovecot's ``mail_attribute_dict`` points here.  Keys on the wire:

    priv/<mailbox-guid>/devicetoken    SET stores/refreshes the account's device token;
                                       LOOKUP answers every valid token, space-separated
    priv/<mailbox-guid>/messagenew     SET (from the LMTP Lua push hook) queues one push
                                       notification per device token of the account
    .../vendor/deltachat/irohrelay     iroh_relay; when empty (the default) our own
                                       chatmail-iroh's https://mail_domain if it
                                       answers and the certificate is ACME's, else N
    .../vendor/deltachat/turn          <host>:<turn_port>:<user>:<password>: credentials
                                       for coturn made with the shared turn secret, when
                                       coturn answers on turn_port; else read from
                                       chatmail-turn's turn_socket_path; else N
    .../vendor/deltachat/maxsmtprecipients
                                       1000, Postfix's smtpd_recipient_limit
    .../vendor/deltachat/appversions   the file appversions_path, on one line (default: the
                                       packaged chatmaild/data/appversions.json); N when it
                                       is empty, missing or malformed (logged once), see
                                       chatmaild.dictd.appversions

Every other lookup answers N, every other change fails the transaction (F).
Tokens expire 90 days after they were last set.  A notification is on disk in
notification_dir before the SET is answered, and is retried until delivered,
gone (410) or 5 hours old; see chatmaild.dictd.push.

LOG LINES
    notification exceeded deadline
    Notification request failed: REASON; retry N in S s

FILES
    /etc/chatmail/chatmail.ini          configuration (metadata_socket, notification_url,
                                        notification_dir, iroh_relay, turn_socket_path,
                                        appversions_path, ...)
    <mailboxes_dir>/<addr>/metadata.json  device tokens of one account
    <notification_dir>/<id>             one pending notification each

SIGNALS
    SIGTERM, SIGINT    finish requests in flight, then exit 0; queued notifications stay
                       on disk and are sent after the next start
"""

from __future__ import annotations

import asyncio
import time

from chatmaild.common import metrics
from chatmaild.common.addr import AddressError
from chatmaild.common.config import Config
from chatmaild.common.service import Endpoint, run_daemon
from chatmaild.common.turn import credentials, metadata_value, read_secret
from chatmaild.dictd.appversions import AppVersionsFile
from chatmaild.dictd.proxy import DictDaemon, Transaction
from chatmaild.dictd.push import Notifier
from chatmaild.dictd.tokens import TokenError, TokenStore

TURN_TIMEOUT = 5.0
PROBE_EVERY = 10.0  # seconds a "coturn (chatmail-iroh) answers" finding is reused
MAX_SMTP_RECIPIENTS = 1000  # Postfix's default smtpd_recipient_limit; clients chunk by it
VENDOR = "/vendor/deltachat/"


def private_key_name(key: str) -> str | None:
    """``priv/<guid>/<name>`` -> ``name``; None for any other key."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "priv" and parts[1]:
        return parts[2]
    return None


def server_key_name(key: str) -> str | None:
    """The Delta Chat key name of ``shared/.../vendor/deltachat/<name>``; None otherwise."""
    if not key.startswith("shared/"):
        return None
    head, sep, name = key.rpartition(VENDOR)
    if not sep or not name or "/" in name:
        return None
    return name


def turn_answer(host: str, port: int, line: str) -> str | None:
    """``host:port:user:password`` from chatmail-turn's credentials line; None if the
    line is not user:password."""
    line = line.strip()
    user, sep, password = line.partition(":")
    if not sep or not user or not password or any(c.isspace() for c in line):
        return None
    # core splits on ":", so an IP relay's host goes out bare, never "[1.2.3.4]"
    return metadata_value(host, port, user, password)


def own_iroh_relay_serves_apps(c: Config) -> bool:
    """Whether the apps can use our chatmail-iroh at https://mail_domain: the core's
    iroh trusts only public CAs, so a certificate from ACME on a domain name (not
    make run's self-signed one, nor an IP-only relay's)."""
    return bool(c.iroh_relay_port) and bool(c.acme_directory) and not c.is_ip_domain


async def tcp_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def read_turn_credentials(path: str, timeout: float = TURN_TIMEOUT) -> str | None:
    """One line from the TURN credentials socket, or None if it fails or times out."""

    async def read() -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            return await reader.readline()
        finally:
            writer.close()

    try:
        line = await asyncio.wait_for(read(), timeout)
    except (OSError, TimeoutError, ValueError):
        return None
    return line.decode("utf-8", "replace") if line else None


class MetadataDaemon(DictDaemon):
    name = "chatmail-metadata"

    def __init__(self, config: Config, args=None) -> None:
        super().__init__(config, args)
        self.tokens = TokenStore(config)
        self.notifier = Notifier(config, self.tokens)
        self.appversions = AppVersionsFile(config.appversions_path, self.log)
        self._probed: dict[int, tuple[float, bool]] = {}  # port -> (when, answered)

    def endpoint(self) -> Endpoint:
        return Endpoint.unix(self.config.metadata_socket)

    async def start(self) -> None:
        if not self.config.mailboxes_path.is_dir():
            # without it neither tokens nor the queue can be stored; say so instead of a traceback
            self.log.error("mailboxes_dir %s does not exist", self.config.mailboxes_dir)
            raise SystemExit(1)
        try:
            await self.notifier.start()
        except OSError as e:
            self.log.error("cannot use notification_dir %s: %s", self.config.notification_dir, e)
            raise SystemExit(1) from None

    async def stop(self) -> None:
        await self.notifier.stop()

    async def lookup(self, key: str, user: str | None) -> str | None:
        name = private_key_name(key)
        if name == "devicetoken":
            if not user:
                return None
            try:
                tokens = await asyncio.to_thread(self.tokens.tokens, user)
            except AddressError as e:
                self.log.warning("devicetoken lookup for %r: %s", user, e)
                return None
            return " ".join(tokens)  # "" (found, empty) when the account has none
        name = server_key_name(key)
        if name is not None:
            answer = await self.server_value(name)
            if answer is not None:
                return answer
        self.log.debug("no value for metadata key %r", key[:200])
        return None

    async def server_value(self, name: str) -> str | None:
        c = self.config
        if name == "irohrelay":
            if c.iroh_relay:
                return c.iroh_relay
            if own_iroh_relay_serves_apps(c) and await self.answers(c.iroh_relay_port):
                return f"https://{c.mail_domain}"
            return None
        if name == "turn":
            secret = read_secret(c.turn_secret_path)
            if secret is not None and await self.answers(c.turn_port):
                user, password = credentials(secret, time.time(), c.turn_credentials_ttl)
                return metadata_value(c.mail_domain, c.turn_port, user, password)
            line = await read_turn_credentials(c.turn_socket_path)
            if line is None:
                why = "coturn does not answer on port %d, nor chatmail-turn on %s"
                self.log.warning("no TURN server: " + why, c.turn_port, c.turn_socket_path)
                return None
            return turn_answer(c.mail_domain, c.turn_port, line)
        if name == "maxsmtprecipients":
            return str(MAX_SMTP_RECIPIENTS)
        if name == "appversions":
            return self.appversions.value()
        return None

    async def answers(self, port: int) -> bool:
        """Whether our coturn (chatmail-iroh) listens on ``port``: advertise only what
        exists; a finding is reused for a few seconds."""
        when, answered = self._probed.get(port, (0.0, False))
        now = time.monotonic()
        if now - when > PROBE_EVERY:
            # loopback, or an IP-only relay's own address (make run listens there)
            c = self.config
            host = c.mail_domain.strip("[]") if c.is_ip_domain else "127.0.0.1"
            answered = await tcp_answers(host, port)
            self._probed[port] = (now, answered)
        return answered

    async def commit(self, txn: Transaction) -> bool:
        if not txn.user:
            self.log.warning("metadata transaction without a user")
            return False
        ok = True
        for change in txn.changes:
            name = private_key_name(change.key)
            try:
                if name == "devicetoken" and change.op == "set":
                    await asyncio.to_thread(self.tokens.add, txn.user, str(change.value))
                    metrics.PUSH_TOKENS.inc()
                elif name == "messagenew" and change.op in ("set", "unset"):
                    await self.notifier.notify(txn.user)
                else:
                    self.log.warning("refusing metadata %s of %r", change.op, change.key[:200])
                    ok = False
            except (AddressError, TokenError) as e:
                self.log.warning("metadata %s of %r for %r: %s", change.op, name, txn.user, e)
                ok = False
            except OSError as e:
                self.log.error("metadata %s of %r for %r: %s", change.op, name, txn.user, e)
                ok = False
        return ok


def main(argv: list[str] | None = None) -> int:
    return run_daemon(MetadataDaemon, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
