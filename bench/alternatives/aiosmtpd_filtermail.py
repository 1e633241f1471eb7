"""filtermail outgoing with aiosmtpd's ``SMTP`` protocol class in front (bench only).

    python -m bench.alternatives.aiosmtpd_filtermail --config INI

The same :class:`~chatmaild.filtermail.outgoing.OutgoingHandler`, re-injection
pool, DKIM signer and event loop (uvloop) as ``filtermail outgoing``; only the
SMTP server differs, so ``bench_aiosmtpd`` compares the two servers alone.  Our
strictness is kept where aiosmtpd leaves it out: a message with a bare CR or LF
is refused after the terminator (aiosmtpd ends DATA only at CRLF.CRLF and reads
an oversize message to its end before its 552, as ours does).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from aiosmtpd.smtp import SMTP

from chatmaild.common.config import read_config
from chatmaild.filtermail.main import load_signer
from chatmaild.filtermail.outgoing import OutgoingHandler
from chatmaild.filtermail.reinject import ReinjectClient
from chatmaild.filtermail.smtp import Envelope, Session, has_bare_cr_or_lf


class Adapter:
    """aiosmtpd's handler hooks calling our handler with our envelope."""

    def __init__(self, handler: OutgoingHandler) -> None:
        self.handler = handler

    @staticmethod
    def _ours(session, envelope) -> tuple[Session, Envelope]:
        if not hasattr(session, "ours"):
            session.ours = Session(peer=str(session.peer))
        if not hasattr(envelope, "ours"):
            envelope.ours = Envelope()
        return session.ours, envelope.ours

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802
        sess, env = self._ours(session, envelope)
        reply = await self.handler.handle_mail(sess, env, address)
        if reply:
            return reply
        env.mail_from, env.mail_params = address, list(mail_options)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        sess, env = self._ours(session, envelope)
        reply = await self.handler.handle_rcpt(sess, env, address)
        if reply:
            return reply
        env.rcpt_tos.append(address)
        env.rcpt_params.append(list(rcpt_options))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        sess, env = self._ours(session, envelope)
        content = envelope.original_content
        if has_bare_cr_or_lf(content):
            return "550 5.6.0 bare CR or LF in message"
        return await self.handler.handle_data(sess, env, bytearray(content))


async def serve(ini: str) -> None:
    config = read_config(ini)
    reinject = ReinjectClient(config.postfix_reinject_socket)
    adapter = Adapter(OutgoingHandler(config, reinject, load_signer(config)))
    path = config.filtermail_smtp_socket
    if os.path.exists(path):
        os.unlink(path)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(
        lambda: SMTP(
            adapter,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.mail_domain,
            timeout=config.filtermail_idle_timeout,
        ),
        path,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    await reinject.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(serve(args.config))


if __name__ == "__main__":
    main()
