"""filtermail outgoing as a milter in submission's own smtpd session (bench only).

    python -m bench.alternatives.milter_filtermail --config INI --socket PATH

Postfix's ``smtpd_milters`` instead of ``smtpd_proxy_filter``, measured by
``bench_milter`` and not offered (README, "Design notes"): the same
:class:`~chatmaild.filtermail.outgoing.OutgoingHandler` decides, with the same
replies (Postfix passes a milter's reply on to the client): rate limit at
MAIL FROM, From/encryption checks at end of message.  What the proxy filter
would re-inject becomes edits of the message Postfix already holds: header
fields deleted or changed (privacy cleanup), Date/Message-ID added, the DKIM
signature inserted on top, recipients of disabled accounts removed, mail of a
disabled sender discarded.  Postfix answers 250 only after its cleanup has
applied the edits and queued the mail: no second smtpd session, no second
queue file.

What a milter cannot do: it gets the header section as Postfix parsed it, so
``From :`` arrives as ``From`` and a line that is no field ends the header
section (the rest is body); the proxy filter's ``554 5.6.0`` refusals of such
header sections cannot be given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from chatmaild.common.config import Config, read_config
from chatmaild.filtermail.dkim import Signer
from chatmaild.filtermail.headers import Field, HeaderError, parse_fields
from chatmaild.filtermail.main import load_signer
from chatmaild.filtermail.milter import header_block, serve_packets
from chatmaild.filtermail.outgoing import OutgoingHandler
from chatmaild.filtermail.smtp import Envelope, Session

log = logging.getLogger("filtermail")

# protocol flags (libmilter mfdef.h)
P_NOCONNECT, P_NOHELO, P_NOUNKNOWN, P_NODATA = 0x1, 0x2, 0x100, 0x200
P_NR_HDR, P_NR_RCPT, P_NR_EOH, P_NR_BODY = 0x80, 0x8000, 0x40000, 0x80000
P_HDR_LEADSPC = 0x100000
WANTED = (
    P_NOCONNECT | P_NOHELO | P_NOUNKNOWN | P_NODATA
    | P_NR_HDR | P_NR_RCPT | P_NR_EOH | P_NR_BODY | P_HDR_LEADSPC
)  # fmt: skip
# actions: add headers, delete recipients, change/delete headers
ACTION_ADDHDRS, ACTION_DELRCPT, ACTION_CHGHDRS = 0x01, 0x08, 0x10
ACTIONS = ACTION_ADDHDRS | ACTION_DELRCPT | ACTION_CHGHDRS

TOO_BIG = "552 5.3.4 Message exceeds maximum size"
TEMPFAIL = "451 4.3.0 Temporary filter failure, try again later"


@dataclass
class MilterEnvelope(Envelope):
    """The envelope plus what the handler would have re-injected (None: nothing)."""

    accepted: tuple[list[int], Sequence[bytes]] | None = None


class MilterOutgoingHandler(OutgoingHandler):
    """The outgoing handler with "re-injection" recorded instead of sent."""

    def __init__(self, config: Config, signer: Signer | None) -> None:
        super().__init__(config, None, signer)  # type: ignore[arg-type]  # nothing re-injects

    async def deliver(
        self, env: Envelope, mail_from: str, rcpts: list[int], chunks: Sequence[bytes]
    ) -> str:
        assert isinstance(env, MilterEnvelope)
        env.accepted = (rcpts, chunks)
        return "250 OK"


def _envelope_address(data: bytes) -> tuple[str, list[str]]:
    """Address (angle brackets removed) and ESMTP parameters of a MAIL/RCPT event."""
    args = [a.decode("utf-8", "surrogateescape") for a in data.split(b"\0") if a]
    if not args:
        return "", []
    addr = args[0]
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    return addr, args[1:]


def _packet(code: bytes, *parts: bytes, index: int | None = None) -> bytes:
    head = code if index is None else code + struct.pack(">I", index)
    return head + b"".join(p + b"\0" for p in parts)


def _milter_value(field: Field) -> bytes:
    """A field's value as a milter sends it back: folding with LF, no final line end."""
    return field.value.replace(b"\r\n", b"\n")


def reply_packet(reply: str) -> bytes:
    """SMFIR_REPLYCODE: Postfix gives the client this text (one line, no NUL)."""
    text = reply.translate({13: " ", 10: " ", 0: " "})
    return _packet(b"y", text.encode("utf-8", "surrogateescape"))


def header_edits(before: list[Field], after: list[Field], leading_space: bool) -> list[bytes]:
    """Milter packets that turn header section ``before`` into ``after``, where ``after``
    is ``before`` with fields removed or changed in place and new ones appended.

    Changes go first and deletions from the last occurrence of a name up, so
    every index still names the field it was computed for.
    """
    changes, deletions, seen = [], [], Counter()
    j = 0
    for field in before:
        seen[field.lname] += 1
        index = seen[field.lname]
        if j < len(after) and after[j].lname == field.lname:
            if after[j].raw != field.raw:
                value = _milter_value(after[j])
                if not leading_space:
                    value = value.lstrip(b" ")
                changes.append(_packet(b"m", field.name, value, index=index))
            j += 1
        else:
            deletions.append((index, field.name))
    deletions.sort(key=lambda d: -d[0])
    edits = changes + [_packet(b"m", name, b"", index=index) for index, name in deletions]
    for field in after[j:]:
        value = _milter_value(field)
        edits.append(_packet(b"h", field.name, value if leading_space else value.lstrip(b" ")))
    return edits


class OutgoingMilterSession:
    """One Postfix smtpd connection's milter dialogue; one message at a time."""

    def __init__(self, handler: MilterOutgoingHandler, max_size: int) -> None:
        self.handler = handler
        self.max_size = max_size
        self.flags = 0
        self.session = Session(peer="postfix-milter")
        self.env = MilterEnvelope()
        self.reset()

    def reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.size = 0

    def _reply(self, bit: int) -> list[bytes]:
        return [] if self.flags & bit else [b"c"]

    async def serve(self, reader, writer) -> None:
        await serve_packets(reader, writer, self.command)

    async def command(self, cmd: bytes, data: bytes) -> list[bytes] | None:
        if cmd == b"O":
            _version, actions, protocol = struct.unpack(">III", data[:12])
            if actions & ACTIONS != ACTIONS:
                log.error("milter: Postfix does not offer header and recipient edits; closing")
                return None
            self.flags = protocol & WANTED
            return [b"O" + struct.pack(">III", 6, ACTIONS, self.flags)]
        if cmd == b"D":  # macros: never answered
            return []
        if cmd == b"M":
            self.reset()
            addr, params = _envelope_address(data)
            self.env = MilterEnvelope(mail_from=addr, mail_params=params)
            refusal = await self.handler.handle_mail(self.session, self.env, addr)
            return [reply_packet(refusal)] if refusal else [b"c"]
        if cmd == b"R":
            addr, params = _envelope_address(data)
            self.env.rcpt_tos.append(addr)
            self.env.rcpt_params.append(params)
            return self._reply(P_NR_RCPT)
        if cmd == b"L":
            name, _, rest = data.partition(b"\0")
            value = rest[:-1] if rest.endswith(b"\0") else rest
            self.headers.append((name, value))
            self.size += len(data)
            return self._reply(P_NR_HDR)
        if cmd == b"N":
            return self._reply(P_NR_EOH)
        if cmd == b"B":
            self.size += len(data)
            if self.size <= self.max_size:
                self.body += data
            return self._reply(P_NR_BODY)
        if cmd == b"E":
            self.body += data
            self.size += len(data)
            try:
                return await self.end_of_message()
            except Exception as e:  # a bug must cost a retry, never the daemon
                log.exception("milter: end of message failed: %r", e)
                return [reply_packet(TEMPFAIL)]
            finally:
                self.reset()
        if cmd in (b"A", b"K"):  # message aborted / next connection: forget the message
            self.reset()
            self.env = MilterEnvelope()
            return []
        if cmd == b"Q":
            return None
        if cmd in (b"C", b"H", b"T", b"U"):  # events we asked not to get, should they come
            return [b"c"]
        log.warning("milter: unknown command %r; closing", cmd)
        return None

    async def end_of_message(self) -> list[bytes]:
        if self.size > self.max_size:
            return [reply_packet(TOO_BIG)]
        leading_space = bool(self.flags & P_HDR_LEADSPC)
        block = header_block(self.headers, leading_space)
        content = bytearray(block)
        content += b"\r\n"
        content += self.body
        reply = await self.handler.handle_data(self.session, self.env, content)
        if not reply.startswith("250"):
            return [reply_packet(reply)]
        if self.env.accepted is None:  # dropped on purpose (disabled sender or recipients)
            return [b"d"]
        kept, chunks = self.env.accepted
        edits: list[bytes] = []
        signature = chunks[0] if len(chunks) == 4 else None  # [signature,] headers, CRLF, body
        cleaned = chunks[-3]
        try:
            before = parse_fields(block)
            after = parse_fields(bytes(cleaned))
        except HeaderError as e:  # classify() parsed it already; be safe anyway
            return [reply_packet(e.reply)]
        if signature is not None:
            (field,) = parse_fields(bytes(signature))
            value = _milter_value(field)
            edits.append(_packet(b"i", field.name, value if leading_space else value.lstrip(b" "),
                                 index=0))  # fmt: skip
        edits += header_edits(before, after, leading_space)
        for i, rcpt in enumerate(self.env.rcpt_tos):
            if i not in kept:
                edits.append(_packet(b"-", f"<{rcpt}>".encode("utf-8", "surrogateescape")))
        return [*edits, b"c"]


async def serve(ini: str, path: str) -> None:
    config = read_config(ini)
    handler = MilterOutgoingHandler(config, load_signer(config))
    if os.path.exists(path):
        os.unlink(path)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await OutgoingMilterSession(handler, config.max_message_size).serve(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(connection, path)
    os.chmod(path, 0o660)  # the socket directory's group (postfix) connects
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(serve(args.config, args.socket))


if __name__ == "__main__":
    main()
