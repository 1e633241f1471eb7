"""Outgoing policy (Postfix ``smtpd_proxy_filter`` of submission/submissions).

MAIL FROM: syntax, then the per-sender rate limit (``450 4.7.1``).  End of
DATA: the From header must be the envelope sender (``500``); only OpenPGP
encrypted mail, Secure-Join requests, a self-sent Autocrypt Setup Message, and
cleartext from a ``passthrough_senders`` address or to ``passthrough_recipients``
only (addresses or ``@domain``) may leave (else ``523``).  Accepted mail gets
its privacy header cleanup, a DKIM signature when it leaves the relay, and is
re-injected into Postfix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from chatmaild.common.config import Config
from chatmaild.common.ratelimit import RateLimiter
from chatmaild.filtermail.common import BaseHandler, clean_outgoing_headers, domain_of
from chatmaild.filtermail.dkim import DKIMError, Signer
from chatmaild.filtermail.reinject import ReinjectClient
from chatmaild.filtermail.smtp import Envelope, Session

log = logging.getLogger("filtermail")

ENCRYPTION_NEEDED = "523 Encryption Needed: Invalid Unencrypted Mail"


def is_passthrough(
    mail_from: str, rcpts: Sequence[str], senders: Sequence[str], recipients: Sequence[str]
) -> bool:
    """Whether cleartext may leave by configuration (reference semantics): the
    sender is listed in ``senders``, or every recipient is listed in
    ``recipients`` as an address or by its ``@domain``.  Lists are lower case."""
    if mail_from.lower() in senders:
        return True
    domains = {r for r in recipients if r.startswith("@")}
    return bool(rcpts) and all(
        r.lower() in recipients or "@" + r.rpartition("@")[2].lower() in domains for r in rcpts
    )


class OutgoingHandler(BaseHandler):
    outgoing = True
    direction = "outgoing"

    def __init__(self, config: Config, reinject: ReinjectClient, signer: Signer | None) -> None:
        super().__init__(config, reinject)
        self.signer = signer
        self.local_domain = config.mail_domain.lower()
        self.limiter = RateLimiter(config.max_user_send_per_minute, config.max_user_send_burst_size)

    async def handle_mail(self, session: Session, env: Envelope, address: str) -> str | None:
        if not address:
            return None  # bounces (null sender) are not rate limited
        addr = address.lower()
        if addr.count("@") != 1:
            return f"500 Invalid from address <{addr}>"
        wait = self.limiter.check(addr)
        if wait:
            log.info("rate limit: too much mail from %s", addr)
            return f"450 4.7.1: Too much mail from {addr}, try again in {wait:.0f} s"
        return None

    def passthrough(self, mail_from: str, rcpts: list[str]) -> bool:
        c = self.config
        if is_passthrough(mail_from, rcpts, c.passthrough_senders, c.passthrough_recipients):
            log.info("passthrough: unencrypted mail from %s allowed", mail_from)
            return True
        return False

    def leaves_relay(self, rcpts: Iterable[str]) -> bool:
        """True if some recipient is on another domain.  Mail for our own users
        goes straight to their mailboxes where nobody checks DKIM, so it is not
        signed: the RSA signature is the largest part of filtering a message."""
        return any(domain_of(a).lower() != self.local_domain for a in rcpts)

    async def handle_data(self, session: Session, env: Envelope, content: bytearray) -> str:
        result = await self.classify(content, env)
        if isinstance(result, str):
            return result
        mail_from = (env.mail_from or "").lower()
        if mail_from != result.from_addr:
            return f"500 Invalid FROM <{result.from_addr}> for <{mail_from}>"
        if result.encrypted or result.securejoin:
            log.info("Outgoing: Filtering encrypted mail.")
        else:
            log.info("Outgoing: Filtering unencrypted mail.")
            if not result.autocrypt_setup and not self.passthrough(mail_from, env.rcpt_tos):
                log.info("Rejected unencrypted mail from: %s", result.from_addr)
                return ENCRYPTION_NEEDED
        if self.is_disabled(mail_from):
            log.info("dropped mail from disabled account %s", mail_from)
            return "250 OK"
        rcpts = [i for i, a in enumerate(env.rcpt_tos) if not self.is_disabled(a)]
        if not rcpts:
            log.info("All recipients disabled; mail dropped")
            return "250 OK"

        body_start = result.body_start
        headers = clean_outgoing_headers(result.fields, self.config.mail_domain)
        chunks = [headers, b"\r\n", memoryview(content)[body_start:]]
        if self.signer is not None and self.leaves_relay(env.rcpt_tos[i] for i in rcpts):
            try:
                signature = await self.signer.sign_async(headers, content, body_start)
            except DKIMError as e:
                log.warning("cannot DKIM-sign mail from %s: %s", mail_from, e)
                return "554 5.6.0 Message headers cannot be signed"
            chunks.insert(0, signature)
        return await self.deliver(env, env.mail_from or "", rcpts, chunks)
