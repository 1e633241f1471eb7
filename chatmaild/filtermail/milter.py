"""A minimal milter that DKIM-signs mail Postfix generates itself (bounces,
delay notices), for ``non_smtpd_milters`` with ``internal_mail_filter_classes
= bounce``.  Mail submitted by users is signed by the outgoing filter; this
covers everything else that leaves the relay.

Milter protocol version 6: we ask Postfix to skip the connect/HELO/envelope
steps, collect headers and body, and at end of message insert the
``DKIM-Signature`` header on top.  Mail whose From domain is not ours, or that
already carries our signature, passes untouched.  Any problem answers
"tempfail" so Postfix keeps the mail and retries rather than send it unsigned.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable

from chatmaild.common.addr import header_addresses, valid_addr_spec
from chatmaild.filtermail.dkim import Signer, body_hash_async

log = logging.getLogger("filtermail")

# protocol flags (libmilter mfapi.h)
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x1, 0x2, 0x4, 0x8
P_NR_HDR, P_NOUNKNOWN, P_NODATA = 0x80, 0x100, 0x200
P_NR_EOH, P_NR_BODY, P_HDR_LEADSPC = 0x40000, 0x80000, 0x100000
WANTED = (
    P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOUNKNOWN | P_NODATA
    | P_NR_HDR | P_NR_EOH | P_NR_BODY | P_HDR_LEADSPC
)  # fmt: skip
ACTION_ADDHDRS = 0x01
MAX_PACKET = 1 << 20


Command = Callable[[bytes, bytes], Awaitable["list[bytes] | None"]]


async def serve_packets(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: Command
) -> None:
    """The milter wire format: length-prefixed packets, one command letter each.

    ``command(letter, data)`` returns the reply packets (possibly none), or None
    to close the connection.
    """
    while True:
        try:
            head = await reader.readexactly(4)
            (length,) = struct.unpack(">I", head)
            if not 1 <= length <= MAX_PACKET:
                log.warning("milter: bad packet length %d; closing", length)
                return
            packet = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return
        replies = await command(packet[:1], packet[1:])
        if replies is None:
            return
        for r in replies:
            writer.write(struct.pack(">I", len(r)) + r)
        if replies:
            await writer.drain()


def header_block(headers: list[tuple[bytes, bytes]], leading_space: bool) -> bytes:
    """The header section (CRLF line ends) from milter header events; ``leading_space``:
    the values keep the space after the colon (SMFIP_HDR_LEADSPC was agreed)."""
    lead = b"" if leading_space else b" "
    lines = []
    for name, value in headers:
        value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        lines.append(name + b":" + lead + value + b"\r\n")
    return b"".join(lines)


class MilterSession:
    def __init__(self, signer: Signer, domain: str, max_size: int) -> None:
        self.signer = signer
        self.domain = domain.lower()
        self.max_size = max_size
        self.flags = 0
        self.reset()

    def reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.too_big = False

    def _no_reply(self, bit: int) -> bool:
        return bool(self.flags & bit)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_packets(reader, writer, self.command)

    async def command(self, cmd: bytes, data: bytes) -> list[bytes] | None:
        """Replies for one milter command; None closes the connection."""
        if cmd == b"O":
            version, actions, protocol = struct.unpack(">III", data[:12])
            self.flags = protocol & WANTED
            return [b"O" + struct.pack(">III", 6, actions & ACTION_ADDHDRS, self.flags)]
        if cmd == b"D":  # macros: never answered
            return []
        if cmd == b"L":
            name, _, rest = data.partition(b"\0")
            value = rest.rstrip(b"\0")
            self.headers.append((name, value))
            return [] if self._no_reply(P_NR_HDR) else [b"c"]
        if cmd == b"N":
            return [] if self._no_reply(P_NR_EOH) else [b"c"]
        if cmd == b"B":
            if len(self.body) + len(data) > self.max_size:
                self.too_big = True
            else:
                self.body += data
            return [] if self._no_reply(P_NR_BODY) else [b"c"]
        if cmd == b"E":
            if data:
                self.body += data
            replies = await self.end_of_message()
            self.reset()
            return replies
        if cmd == b"A":
            self.reset()
            return []
        if cmd == b"K":
            self.reset()
            return []
        if cmd == b"Q":
            return None
        # connect/helo/mail/rcpt/data/unknown if Postfix sends them anyway
        if cmd in (b"C", b"H", b"M", b"R", b"T", b"U"):
            return [b"c"]
        log.warning("milter: unknown command %r; closing", cmd)
        return None

    def _header_block(self) -> bytes:
        return header_block(self.headers, bool(self.flags & P_HDR_LEADSPC))

    def _from_domain(self) -> str | None:
        """Domain of the first From header's single address (None if it has none)."""
        for name, value in self.headers:
            if name.lower() == b"from":
                found = header_addresses(value.decode("utf-8", "replace"))
                addr = valid_addr_spec(found[0]) if found and len(found) == 1 else None
                return addr.rpartition("@")[2] if addr else None
        return None

    async def end_of_message(self) -> list[bytes]:
        if self.too_big:
            log.warning("milter: message too big to sign; tempfail")
            return [b"t"]
        if self._from_domain() != self.domain:
            return [b"c"]
        for name, value in self.headers:
            if name.lower() == b"dkim-signature" and b"d=" + self.domain.encode() in value.replace(
                b" ", b""
            ):
                return [b"c"]  # already signed by the outgoing filter
        body = bytes(self.body).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        try:
            bh = await body_hash_async(body, 0, b"simple")
            header = self.signer.sign_with_hash(self._header_block(), bh)
        except Exception as e:
            log.error("milter: cannot sign: %s; tempfail", e)
            return [b"t"]
        value = header.split(b":", 1)[1].lstrip(b" ").rstrip(b"\r\n").replace(b"\r\n", b"\n")
        log.info("milter: signed locally generated mail")
        # insert at the top: SMFIR_INSHEADER with index 0
        return [b"i" + struct.pack(">I", 0) + b"DKIM-Signature\0" + value + b"\0", b"c"]
