"""What the outgoing and incoming handlers share: message classification (off
the event loop for large mail), header editing, account flags, re-injection."""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from chatmaild.common.accounts import AccountStore
from chatmaild.common.addr import AddressError
from chatmaild.common.config import Config
from chatmaild.filtermail import mime
from chatmaild.filtermail.headers import Field, HeaderError
from chatmaild.filtermail.reinject import ReinjectClient, ReinjectError
from chatmaild.filtermail.smtp import Envelope, Session

log = logging.getLogger("filtermail")

# above this size the MIME parse and OpenPGP walk run in a worker thread; the
# semaphore bounds how many large messages are parsed at once (memory)
THREAD_THRESHOLD = 128 * 1024
LARGE_PARSES = 2


@dataclass
class Classification:
    fields: list[Field]  # the top-level header fields, as every check saw them
    header_end: int  # the header section is content[:header_end]
    body_start: int
    from_header: str  # raw value of the first From header ("" if none)
    from_addr: str | None  # lowercased address from the From header
    encrypted: bool
    securejoin: bool
    autocrypt_setup: bool  # a self-sent Autocrypt Setup Message (outgoing only)
    mailer_daemon: bool  # a delivery report from a mailer-daemon (incoming only)


def classify(
    content: bytes | bytearray, outgoing: bool, mail_from: str, rcpts: Sequence[str]
) -> Classification:
    """Pure and CPU-bound: everything the policy needs to know about a message.

    Raises HeaderError for a header section that is refused as a whole.
    """
    # ParsedMessage slices the buffer with memoryviews: no copy of a large message
    msg = mime.ParsedMessage(content)  # type: ignore[arg-type]
    from_header = msg.get("From") or ""
    from_addr = mime.from_address(msg)
    encrypted = mime.is_encrypted(msg, outgoing)
    securejoin = not encrypted and mime.is_securejoin(msg)
    asm = False
    daemon = False
    if outgoing and not (encrypted or securejoin):
        asm = mime.is_self_sent_autocrypt_setup(msg, mail_from, list(rcpts))
    if not outgoing and not (encrypted or securejoin):
        daemon = mime.is_mailer_daemon_report(msg)
    return Classification(
        msg.fields,
        msg.header_end,
        msg.body_start,
        from_header,
        from_addr,
        encrypted,
        securejoin,
        asm,
        daemon,
    )


class BaseHandler:
    outgoing = True

    def __init__(self, config: Config, reinject: ReinjectClient) -> None:
        self.config = config
        self.accounts = AccountStore(config)
        self.reinject = reinject
        self._large = asyncio.Semaphore(LARGE_PARSES)

    async def classify(self, content: bytearray, env: Envelope) -> Classification | str:
        """The classification, or an SMTP error reply if the message does not parse
        or has no single From address."""
        args = (env.mail_from or "", env.rcpt_tos)
        try:
            if len(content) > THREAD_THRESHOLD:
                async with self._large:
                    result = await asyncio.to_thread(classify, content, self.outgoing, *args)
            else:
                result = classify(content, self.outgoing, *args)
        except HeaderError as e:
            log.info("refused header section: %s", e.reply)
            return e.reply
        except Exception as e:  # a parser bug must not look like an accepted message
            log.info("failed to parse message: %r", e)
            return f"500 Failed to parse message: {type(e).__name__}"
        if not result.from_addr:  # both directions need the author: alignment, DKIM domain
            return f"500 Invalid FROM header: {result.from_header[:200]}"
        return result

    def is_disabled(self, addr: str) -> bool:
        try:
            return self.accounts.account(addr).is_disabled
        except AddressError:
            return False

    def cleartext_ok(self, addr: str) -> bool:
        try:
            return not self.accounts.account(addr).enforces_e2ee_incoming
        except AddressError:
            return False

    async def handle_rcpt(self, session: Session, env: Envelope, address: str) -> str | None:
        return None

    async def deliver(
        self, env: Envelope, mail_from: str, rcpts: list[int], chunks: Sequence[bytes]
    ) -> str:
        """Re-inject; '250 OK' only after Postfix accepted, else the reply to pass back."""
        try:
            answer = await self.reinject.send(
                mail_from,
                env.mail_params,
                [(env.rcpt_tos[i], env.rcpt_params[i]) for i in rcpts],
                chunks,
            )
        except ReinjectError as e:
            return e.reply
        log.debug("re-injected: %s", answer)
        return "250 OK"


# ----------------------------------------------------------------- headers

DROP_HEADERS = {b"received", b"x-originating-ip", b"x-mailer", b"user-agent"}


def clean_outgoing_headers(fields: list[Field], mail_domain: str) -> bytes:
    """Privacy cleanup for mail leaving through this relay (what Postfix's authclean
    also does, done here so it happens before the DKIM signature is made)."""
    out = []
    names = set()
    for f in fields:
        name = f.lname
        names.add(name)
        if name in DROP_HEADERS:
            continue
        out.append(b"Subject: [...]\r\n" if name == b"subject" else f.raw)
    # Postfix would add these on re-injection, after our over-signing of Date
    if b"date" not in names:
        out.append(f"Date: {email.utils.formatdate()}\r\n".encode())
    if b"message-id" not in names:
        domain = mail_domain.strip("[]")
        out.append(f"Message-ID: {email.utils.make_msgid(domain=domain)}\r\n".encode())
    return b"".join(out)


def domain_of(addr: str) -> str:
    return addr.rpartition("@")[2]
