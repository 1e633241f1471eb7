"""Incoming policy (Postfix ``smtpd_proxy_filter`` of the port-25 service).

Encrypted mail, Secure-Join requests and mailer-daemon reports pass; other
cleartext only if no remaining recipient enforces E2EE (``523``).  Then the
origin check: a DKIM signature of exactly the From domain must verify
(``554 5.7.1``; a DNS failure that may be temporary is ``451 4.7.1``).  A
From that differs from the envelope sender resets the return path to
``<>`` (forwarders, and no backscatter to forged senders).

LOG LINES
    DKIM verification failed for mail from ADDR: REPLY (DETAIL)
    DKIM verification deferred, DNS failed: ADDR (DETAIL)     the first of a minute
    DKIM verification deferred, DNS failed: N more from M client(s) in the last 60 s
"""

from __future__ import annotations

import logging

from chatmaild.common import metrics
from chatmaild.common.config import Config
from chatmaild.common.logsummary import TimedSummaryLog
from chatmaild.filtermail.common import BaseHandler, domain_of
from chatmaild.filtermail.dkim import Verifier
from chatmaild.filtermail.outgoing import ENCRYPTION_NEEDED
from chatmaild.filtermail.reinject import ReinjectClient
from chatmaild.filtermail.smtp import Envelope, Session

log = logging.getLogger("filtermail")
# the first of a minute, then "LOG_DEFERRED: N more from M client(s) in the last 60 s"
LOG_DEFERRED = "DKIM verification deferred, DNS failed"


class IncomingHandler(BaseHandler):
    outgoing = False
    direction = "incoming"

    def __init__(self, config: Config, reinject: ReinjectClient, verifier: Verifier | None) -> None:
        super().__init__(config, reinject)
        self.verifier = verifier
        self.deferrals = TimedSummaryLog(log, level=logging.WARNING)

    def close(self) -> None:
        self.deferrals.close()

    async def handle_mail(self, session: Session, env: Envelope, address: str) -> str | None:
        return None

    async def handle_data(self, session: Session, env: Envelope, content: bytearray) -> str:
        result = await self.classify(content, env)
        if isinstance(result, str):
            return result
        mail_from = env.mail_from or ""
        if mail_from.lower() != result.from_addr:
            mail_from = ""
        rcpts = [i for i, a in enumerate(env.rcpt_tos) if not self.is_disabled(a)]
        if result.encrypted or result.securejoin:
            log.info("Incoming: Filtering encrypted mail.")
        elif result.mailer_daemon:
            log.info("Incoming: Filtering mailer-daemon message from %s", result.from_addr)
        else:
            log.info("Incoming: Filtering unencrypted mail.")
            if not all(self.cleartext_ok(env.rcpt_tos[i]) for i in rcpts):
                return ENCRYPTION_NEEDED
        domain = domain_of(result.from_addr)
        if not domain.startswith("[") and self.verifier is not None:
            header_block = bytes(content[: result.header_end])
            verdict = await self.verifier.verify(header_block, content, result.body_start, domain)
            outcome = "pass" if verdict.ok else "temperror" if verdict.reply[:1] == "4" else "fail"
            metrics.DKIM_VERIFY.labels(outcome).inc()
            if not verdict.ok and outcome == "temperror":
                # a DNS outage defers every message: the cause once, then a count
                self.deferrals.note(LOG_DEFERRED, f"{result.from_addr} ({verdict.detail})")
                return verdict.reply
            if not verdict.ok:
                log.info(
                    "DKIM verification failed for mail from %s: %s (%s)",
                    result.from_addr,
                    verdict.reply,
                    verdict.detail,
                )
                return verdict.reply
            log.debug("DKIM ok: %s", verdict.detail)
        if not rcpts:
            log.info("All recipients disabled; mail dropped")
            return "250 OK"
        return await self.deliver(env, mail_from, rcpts, [content])
