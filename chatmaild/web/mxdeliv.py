"""HTTPS delivery from other relays: ``POST /mxdeliv`` on the web port.

A relay whose provider blocks port 25 delivers over HTTPS instead: the envelope
in ``X-MAIL-FROM`` (at most one; absent: the null sender) and ``X-MAIL-TO``
(one per recipient), the message in SMTP DATA form (CRLF lines, dot-stuffed,
without the final dot) as the body, ``Content-Length`` required.

The message then takes port 25's own path: an SMTP session to Postfix's
``postfix/mxdeliv`` service on loopback, whose settings are port 25's (relay
restrictions, size and recipient limits, the incoming filter: DKIM, encryption
for accounts that ask for it), after a PROXY line naming the sending relay, so
Postfix's per-client limits and logs are the sender's.  The answer tells the
sender what to do (README, "HTTPS delivery"):

====  ============================  =========================================
200   delivered                     ``X-Mxdeliv: delivered``
400   malformed request             permanent: header, address or body form
411   no Content-Length             permanent
413   over max_message_size         permanent
422   refused by Postfix (5xx)      permanent; the body is the SMTP reply
408   upload too slow               temporary
429   too many uploads at once      temporary, ``Retry-After``
503   4xx from Postfix, or down     temporary, ``Retry-After``; body the reply
====  ============================  =========================================

Every answer of this route carries ``X-Mxdeliv: delivered | permanent |
temporary``: a sender can tell our answers from a server without the route.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from dataclasses import dataclass

from chatmaild.common.addr import valid_addr_spec
from chatmaild.common.config import Config
from chatmaild.web.limits import SourceBudget, source_of
from chatmaild.web.server import Request, Response
from chatmaild.web.tunnel import proxy_v1

PATH = "/mxdeliv"
MAX_RECIPIENTS = 100  # one message, one relay's users: Postfix's own limit is 1000
MAX_LINE = 2048  # Postfix's line_length_limit: a longer line would be split
MAX_IN_FLIGHT = 32  # uploads at once, in all
MAX_PER_SOURCE = 8  # and from one IPv4 address or IPv6 /64
SPOOL_IN_MEMORY = 256 * 1024  # larger bodies go to a temporary file (PrivateTmp)
REPLY_TIMEOUT = 120.0
FINAL_TIMEOUT = 600.0  # the incoming filter checks the whole message first
RETRY_AFTER = "300"


@dataclass(frozen=True)
class Envelope:
    sender: str  # "" for the null sender
    recipients: tuple[str, ...]


def _envelope_address(text: str) -> bool:
    # nothing SMTP would read as the end of the path or of the command
    if not text or any(c in text for c in "<> \t\r\n"):
        return False
    return valid_addr_spec(text) is not None


def parse_envelope(fields: tuple[tuple[str, str], ...]) -> Envelope | str:
    """The envelope of a request's header fields, or what is wrong with them."""
    senders = [v.strip() for k, v in fields if k == "x-mail-from"]
    recipients = [v.strip() for k, v in fields if k == "x-mail-to"]
    if len(senders) > 1:
        return "X-MAIL-FROM given more than once"
    sender = senders[0] if senders else ""
    if sender and not _envelope_address(sender):
        return f"X-MAIL-FROM is not an address: {sender[:100]!r}"
    if not recipients:
        return "no X-MAIL-TO"
    if len(recipients) > MAX_RECIPIENTS:
        return f"more than {MAX_RECIPIENTS} X-MAIL-TO"
    for rcpt in recipients:
        if not _envelope_address(rcpt):
            return f"X-MAIL-TO is not an address: {rcpt[:100]!r}"
    return Envelope(sender, tuple(recipients))


_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"(?<!\r)\n")


class DataForm:
    """Checks, piece by piece, that a body is in SMTP DATA form: every line ends in
    CRLF, no CR or LF stands alone (SMTP smuggling), no line is a lone dot (the end
    of DATA: a dot-stuffed body has none), no line is over MAX_LINE."""

    def __init__(self) -> None:
        self.partial = b""  # the current line so far
        self.size = 0

    def feed(self, data: bytes) -> str | None:
        """What is wrong, or None."""
        self.size += len(data)
        text = self.partial + data
        # a CR at the very end may be the start of a CRLF in the next piece
        hold = 1 if text.endswith(b"\r") else 0
        body = text[: len(text) - hold]
        if _BARE_CR.search(body) or _BARE_LF.search(body):
            return "a bare CR or LF in the body (lines must end in CRLF)"
        lines = body.split(b"\r\n")
        for line in lines[:-1]:
            if line == b".":
                return "a line with a lone dot in the body (not dot-stuffed)"
            if len(line) > MAX_LINE:
                return f"a body line over {MAX_LINE} bytes"
        self.partial = lines[-1] + text[len(text) - hold :]
        if len(self.partial) > MAX_LINE:
            return f"a body line over {MAX_LINE} bytes"
        return None

    def end(self) -> tuple[bytes, str | None]:
        """What to send after the body (the end of DATA), or what is wrong."""
        if self.size == 0:
            return b"", "an empty body"
        if not self.partial:
            return b".\r\n", None
        if self.partial == b"." or self.partial.endswith(b"\r"):
            return b"", "the body ends with a lone dot or a bare CR"
        return b"\r\n.\r\n", None  # the last line without its CRLF: ended here


def answer(status: int, outcome: str, text: str, **headers: str) -> Response:
    return Response(
        status,
        {"Content-Type": "text/plain; charset=utf-8", "X-Mxdeliv": outcome, **headers},
        (text.rstrip("\n") + "\n").encode(),
    )


def smtp_answer(code: int, text: str) -> Response:
    """The HTTP answer of Postfix's reply ``code`` ``text``."""
    reply = f"{code} {text}"
    if 200 <= code < 300:
        return answer(200, "delivered", reply)
    if 400 <= code < 500:
        return answer(503, "temporary", reply, **{"Retry-After": RETRY_AFTER})
    if code == 552:
        return answer(413, "permanent", reply)
    return answer(422, "permanent", reply)


class SmtpError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text


async def _reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str]:
    """One (possibly multi-line) SMTP reply."""
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line.endswith(b"\n") or len(line) < 4 or not line[:3].isdigit():
            raise SmtpError(451, "4.3.0 broken reply from the mail server")
        lines.append(line[4:].decode("utf-8", "replace").strip())
        if line[3:4] != b"-":
            return int(line[:3]), " ".join(lines)


class Upload:
    """One message being received: its envelope, its body spooled and checked."""

    def __init__(self, route: MxDeliv, request: Request, envelope: Envelope, source: str) -> None:
        self.route = route
        self.request = request
        self.envelope = envelope
        self.source = source  # counted under it in the route's budget
        self.form = DataForm()
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
        self.open = True

    def feed(self, data: bytes) -> Response | None:
        problem = self.form.feed(data)
        if problem is not None:
            return self.route.refused(self, answer(400, "permanent", problem))
        self.spool.write(data)
        return None

    async def finish(self) -> Response:
        try:
            tail, problem = self.form.end()
            if problem is not None:
                return self.route.refused(self, answer(400, "permanent", problem))
            return self.route.delivered(self, await self.route.deliver(self, tail))
        finally:
            self.discard()

    def discard(self) -> None:
        if self.open:
            self.open = False
            self.spool.close()
            self.route.ended(self)


class MxDeliv:
    """The ``/mxdeliv`` route: an upload per request, delivered to ``backend``
    (Postfix's ``postfix/mxdeliv`` service, host and port)."""

    def __init__(self, config: Config, log: logging.Logger, backend: tuple[str, int]) -> None:
        self.config = config
        self.log = log
        self.backend = backend
        self.max_body = config.max_message_size
        self.max_header_fields = 32 + MAX_RECIPIENTS
        busy = "too many uploads at once"
        self.uploads = SourceBudget(MAX_IN_FLIGHT, MAX_PER_SOURCE, busy, busy)

    def begin(self, request: Request) -> Upload | Response:
        envelope = parse_envelope(request.fields)
        if isinstance(envelope, str):
            self.log.info("mxdeliv: 400 from %s: %s", request.remote, envelope)
            return answer(400, "permanent", envelope)
        source = source_of(request.remote)
        refused = self.uploads.take(source)
        if refused is not None:
            self.log.info("mxdeliv: 429 from %s: %s", request.remote, refused)
            return answer(429, "temporary", refused, **{"Retry-After": "10"})
        return Upload(self, request, envelope, source)

    def refusal(self, status: int, why: str) -> Response:
        """411 and 413 are the sender's to fix, 408 (too slow) may pass another time."""
        if status == 408:
            return answer(status, "temporary", why, **{"Retry-After": RETRY_AFTER})
        return answer(status, "permanent", why)

    def ended(self, upload: Upload) -> None:
        self.uploads.give(upload.source)

    def refused(self, upload: Upload, response: Response) -> Response:
        why = response.body.decode().strip()
        self.log.info("mxdeliv: %d from %s: %s", response.status, upload.request.remote, why)
        return response

    def delivered(self, upload: Upload, response: Response) -> Response:
        self.log.info(
            "mxdeliv: %d from %s, %d recipient(s), %d bytes: %s",
            response.status, upload.request.remote, len(upload.envelope.recipients),
            upload.form.size, response.body.decode().strip(),
        )  # fmt: skip
        return response

    async def deliver(self, upload: Upload, tail: bytes) -> Response:
        """Port 25's path for the message; the answer of what Postfix replied."""
        try:
            code, text = await self._session(upload, tail)
        except SmtpError as e:
            code, text = e.code, e.text
        except (OSError, TimeoutError) as e:
            code, text = 451, f"4.3.0 mail server unreachable ({e.__class__.__name__})"
        return smtp_answer(code, text)

    async def _session(self, upload: Upload, tail: bytes) -> tuple[int, str]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.backend), 10)
        try:
            request = upload.request
            peer = request.remote
            writer.write(proxy_v1((peer, 0), request.local))

            async def command(line: str, expect: tuple[int, ...]) -> tuple[int, str]:
                writer.write(line.encode() + b"\r\n")
                code, text = await _reply(reader, REPLY_TIMEOUT)
                if code not in expect:
                    raise SmtpError(code, text)
                return code, text

            code, text = await _reply(reader, REPLY_TIMEOUT)
            if code != 220:
                raise SmtpError(code, text)
            literal = f"[IPv6:{peer}]" if ":" in peer else f"[{peer}]"
            await command(f"EHLO {literal}", (250,))
            env = upload.envelope
            utf8 = not all(a.isascii() for a in (env.sender, *env.recipients))
            params = f" SIZE={upload.form.size}" + (" SMTPUTF8" if utf8 else "")
            await command(f"MAIL FROM:<{env.sender}>{params}", (250,))
            for rcpt in env.recipients:
                # all or none: a refused recipient refuses the message (the sender
                # keeps it whole, retries or bounces it with that reply)
                await command(f"RCPT TO:<{rcpt}>", (250, 251))
            await command("DATA", (354,))
            upload.spool.seek(0)
            while chunk := upload.spool.read(64 * 1024):
                writer.write(chunk)
                await writer.drain()
            writer.write(tail)
            code, text = await _reply(reader, FINAL_TIMEOUT)
            writer.write(b"QUIT\r\n")
            return code, text
        finally:
            writer.close()
