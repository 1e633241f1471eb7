"""Asynchronous SMTP client that hands accepted mail back to Postfix.

Connections are pooled and reused (no connect/EHLO per message); MAIL, all
RCPTs and DATA go out in one write when the server offers PIPELINING.  If a
recipient was refused but DATA was still answered 354, the connection is
dropped before any content is sent, which makes Postfix discard the
transaction: a partly refused envelope never turns into a half-delivered or
empty message.  One timeout bounds each whole transaction.  The message body is
written in slices straight from the caller's buffers (dot-stuffed on the
fly), so a large message is not copied into the transport as a whole.

A message counts as accepted only when Postfix answered 250 to the final
dot; every failure becomes a reply for our own client: Postfix's own answer
for rejections, a 4xx for local trouble, so the sender retries and nothing
is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from chatmaild.filtermail.smtp import dot_stuff

log = logging.getLogger("filtermail")

# a message as pieces that each start at a line start (headers, body, ...)
Chunks = Sequence[bytes | bytearray | memoryview]

WRITE_SLICE = 256 * 1024
COALESCE_LIMIT = 1024 * 1024


class ReinjectError(Exception):
    """Re-injection failed; ``reply`` is what our client should be told."""

    def __init__(self, reply: str, retry_fresh: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.retry_fresh = retry_fresh


@dataclass
class Reply:
    code: int
    text: str  # all lines joined by CRLF, as the server sent them (without final CRLF)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


class ClientConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pipelining = False
        self.stage = "MAIL"  # how far the current transaction got
        self.last_used = time.monotonic()
        self.transactions = 0

    async def read_reply(self) -> Reply:
        """One (possibly multi-line) reply; the caller bounds the time it may take."""
        lines = []
        while True:
            raw = await self.reader.readline()
            if not raw.endswith(b"\n"):
                raise ConnectionError("connection closed by server")
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit():
                raise ConnectionError(f"malformed reply {line!r}")
            lines.append(line)
            if len(line) == 3 or line[3] != "-":
                return Reply(int(line[:3]), "\r\n".join(lines))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class ReinjectClient:
    """A pool of SMTP connections to one Postfix smtpd service on a UNIX socket
    (``path``: reachable only by Postfix and filtermail, unlike a loopback port)."""

    def __init__(
        self,
        path: str,
        helo: str = "localhost",
        *,
        timeout: float = 60.0,
        max_idle: int = 32,
        idle_expiry: float = 50.0,
    ) -> None:
        self.path = path
        self.helo = helo
        self.timeout = timeout
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry  # below Postfix's smtpd_timeout (300 s)
        self._idle: list[ClientConnection] = []

    @property
    def target(self) -> str:
        return self.path

    async def _connect(self) -> ClientConnection:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(self.path, limit=65536)
        except (OSError, TimeoutError) as e:
            log.error("re-injection: cannot connect to %s: %s", self.target, e)
            raise ReinjectError("451 4.4.1 Re-injection failed: cannot connect to Postfix") from e
        conn = ClientConnection(reader, writer)
        try:
            async with asyncio.timeout(self.timeout):
                greeting = await conn.read_reply()
                if greeting.code != 220:
                    raise ReinjectError(self._forwarded(greeting))
                await conn.send(f"EHLO {self.helo}\r\n".encode())
                ehlo = await conn.read_reply()
            if ehlo.code != 250:
                raise ReinjectError(self._forwarded(ehlo))
        except (OSError, TimeoutError, ConnectionError) as e:
            conn.close()
            log.error("re-injection: greeting from %s failed: %s", self.target, e)
            raise ReinjectError("451 4.4.2 Re-injection failed: Postfix did not greet") from e
        except ReinjectError:
            conn.close()
            raise
        caps = {line[4:].split(" ")[0].upper() for line in ehlo.text.split("\r\n")}
        conn.pipelining = "PIPELINING" in caps
        return conn

    def _checkout(self) -> ClientConnection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.last_used < self.idle_expiry and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    def _checkin(self, conn: ClientConnection) -> None:
        conn.last_used = time.monotonic()
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            self._quit(conn)

    def _quit(self, conn: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            conn.writer.write(b"QUIT\r\n")
        conn.close()

    def _forwarded(self, reply: Reply) -> str:
        return f"{reply.text} (forwarded from {self.target})"

    async def send(
        self,
        mail_from: str,
        mail_params: Sequence[str],
        rcpts: Sequence[tuple[str, Sequence[str]]],
        chunks: Chunks,
    ) -> str:
        """Deliver one message (``chunks`` unstuffed, each starting at a line start).

        Returns Postfix's final 250 reply; raises :class:`ReinjectError`.
        """
        envelope = [_cmd(f"MAIL FROM:<{mail_from}>", mail_params)]
        envelope += [_cmd(f"RCPT TO:<{addr}>", params) for addr, params in rcpts]
        conn = self._checkout()
        if conn is not None:
            try:
                return await self._transaction(conn, envelope, chunks, True)
            except ReinjectError as e:
                if not e.retry_fresh:
                    raise
                # the pooled connection had been closed by Postfix: nothing was sent yet
        conn = await self._connect()
        return await self._transaction(conn, envelope, chunks, False)

    async def _transaction(
        self, conn: ClientConnection, envelope: list[bytes], chunks: Chunks, reused: bool
    ) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._exchange(conn, envelope, chunks, reused)
        except (OSError, TimeoutError, ConnectionError) as e:
            conn.close()
            stage = conn.stage
            if reused and stage == "MAIL":
                raise ReinjectError("451 4.4.2 stale connection", retry_fresh=True) from e
            log.error("re-injection to %s failed at %s: %r", self.target, stage, e)
            if stage == "final":
                # Postfix may or may not have queued it: a retry risks a duplicate, never a loss
                raise ReinjectError("451 4.4.2 Re-injection failed: no final answer") from e
            raise ReinjectError("451 4.4.2 Re-injection failed: connection lost") from e
        conn.transactions += 1
        self._checkin(conn)
        if reply.code != 250:
            log.warning("re-injection to %s refused: %s", self.target, reply.text)
            raise ReinjectError(self._forwarded(reply))
        return reply.text

    async def _exchange(
        self, conn: ClientConnection, commands: list[bytes], chunks: Chunks, reused: bool
    ) -> Reply:
        """The SMTP dialogue of one transaction (``commands``: MAIL and the RCPTs);
        ``conn.stage`` says how far it got."""
        conn.stage = "MAIL"
        if conn.pipelining:
            await conn.send(b"".join(commands) + b"DATA\r\n")
            replies = [await conn.read_reply() for _ in commands]
            data_reply: Reply | None = await conn.read_reply()
        else:
            replies = []
            for command in commands:
                await conn.send(command)
                replies.append(await conn.read_reply())
                if not replies[-1].ok:
                    break
            data_reply = None
        failed = next((r for r in replies if not r.ok), None)
        if failed is not None:
            if data_reply is not None and data_reply.code == 354:
                conn.close()  # in DATA already: hanging up makes Postfix drop the transaction
            else:
                await conn.send(b"RSET\r\n")
                await conn.read_reply()
                self._checkin(conn)
            if reused and failed.code == 421:
                raise ReinjectError(failed.text, retry_fresh=True)
            log.warning("re-injection to %s refused: %s", self.target, failed.text)
            raise ReinjectError(self._forwarded(failed))
        conn.stage = "DATA"
        if data_reply is None:
            await conn.send(b"DATA\r\n")
            data_reply = await conn.read_reply()
        if data_reply.code != 354:
            self._checkin(conn)
            raise ReinjectError(self._forwarded(data_reply))
        conn.stage = "content"
        await self._write_content(conn, chunks)
        conn.stage = "final"
        return await conn.read_reply()

    async def _write_content(self, conn: ClientConnection, chunks: Chunks) -> None:
        pieces = [dot_stuff(c) for c in chunks if len(c)]
        last = bytes(pieces[-1][-2:]) if pieces else b""
        pieces.append(b".\r\n" if last in (b"", b"\r\n") else b"\r\n.\r\n")
        total = sum(len(p) for p in pieces)
        if total <= COALESCE_LIMIT:
            # one write, one TCP segment train: the common small chat message
            conn.writer.write(b"".join(pieces))
        else:
            # large: slices straight from the buffers, never a whole-message copy
            for piece in pieces:
                view = memoryview(piece)
                for start in range(0, len(view), WRITE_SLICE):
                    conn.writer.write(view[start : start + WRITE_SLICE])
                    await conn.writer.drain()
        await conn.writer.drain()

    async def close(self) -> None:
        while self._idle:
            self._quit(self._idle.pop())


def _cmd(head: str, params: Sequence[str]) -> bytes:
    return (" ".join([head, *params]) + "\r\n").encode("utf-8")
