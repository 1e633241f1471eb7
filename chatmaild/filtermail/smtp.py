"""A small, strict ESMTP server for before-queue filtering.

It speaks just enough SMTP for Postfix's ``smtpd_proxy_filter`` (and for
anything else that connects): every command line gets exactly one reply,
the DATA terminator is only ``CRLF.CRLF``, bare CR or LF inside a message is
refused (so nothing downstream can see a different end of data than we did:
no SMTP smuggling), an oversize message is read to its terminator and only
then answered ``552``, and dot-stuffing is removed before the handler sees
the message.  The handler decides the reply to MAIL, RCPT and end of DATA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from chatmaild.common import metrics

log = logging.getLogger("filtermail")

MAX_LINE = 4096  # RFC 5321 says 512 for commands; params and SMTPUTF8 need some slack
MAX_RECIPIENTS = 1000
READ_CHUNK = 256 * 1024

# ESMTP parameters we pass through to Postfix on re-injection
MAIL_PARAMS = {"BODY", "SIZE", "SMTPUTF8", "RET", "ENVID"}
RCPT_PARAMS = {"NOTIFY", "ORCPT"}


class ProtocolClose(Exception):
    """Reply (if any) has been sent; the connection must be closed."""


@dataclass
class Envelope:
    """One mail transaction: the envelope as the client gave it (addresses unchanged)."""

    mail_from: str | None = None  # "" for the null sender <>
    mail_params: list[str] = field(default_factory=list)
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_params: list[list[str]] = field(default_factory=list)


@dataclass
class Session:
    peer: str
    helo: str = ""
    started: float = field(default_factory=time.monotonic)


class Handler(Protocol):
    async def handle_mail(self, session: Session, env: Envelope, address: str) -> str | None:
        """Return an error reply, or None to accept (``250 OK``)."""

    async def handle_rcpt(self, session: Session, env: Envelope, address: str) -> str | None:
        """Return an error reply, or None to accept (``250 OK``)."""

    async def handle_data(
        self, session: Session, env: Envelope, content: bytearray
    ) -> str | list[str]:
        """``content`` is the unstuffed message with CRLF line ends; return the reply
        (LMTP: one reply for all recipients, or one per recipient in their order)."""


def dot_unstuff(data: bytearray) -> bytearray:
    """Remove SMTP dot-stuffing in place-ish: only copies when a line starts with a dot."""
    if data.startswith(b"."):
        del data[0]  # bytearray deletes at the front in O(1)
    if data.find(b"\r\n.") < 0:
        return data
    return bytearray(data.replace(b"\r\n.", b"\r\n"))


_DOT_AFTER_CRLF = re.compile(rb"\r\n\.")


def dot_stuff(chunk: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """Stuff a chunk that starts at a line start (the inverse of :func:`dot_unstuff`)."""
    if bytes(chunk[:1]) != b"." and _DOT_AFTER_CRLF.search(chunk) is None:
        return chunk  # the common case (base64 never starts a line with a dot): no copy
    data = bytes(chunk).replace(b"\r\n.", b"\r\n..")
    return b"." + data if data.startswith(b".") else data


def has_bare_cr_or_lf(data: bytes | bytearray) -> bool:
    """True if a CR or LF occurs other than as part of CRLF (counts run in C, no copies)."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def parse_path(arg: str) -> tuple[str, str] | None:
    """Split ``<addr> PARAMS`` into (addr, params); None if there is no proper ``<...>``."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        return None
    quoted = False
    for i in range(1, len(arg)):
        c = arg[i]
        if c == "\\" and quoted:
            continue
        if c == '"' and arg[i - 1] != "\\":
            quoted = not quoted
        elif c == ">" and not quoted:
            addr = arg[1:i]
            # source routes (@a,@b:user@d) are obsolete; keep only the mailbox
            if addr.startswith("@") and ":" in addr:
                addr = addr.split(":", 1)[1]
            return addr, arg[i + 1 :]
    return None


def parse_params(text: str) -> list[str] | None:
    """ESMTP parameters ``KEY[=VALUE]``; None on a syntax error."""
    params = text.split()
    for p in params:
        key = p.split("=", 1)[0]
        if not key or not key.replace("-", "").isalnum():
            return None
    return params


class Connection:
    """One client connection: buffered line/data reading with timeouts, and replies.

    Timeouts cost nothing per read: a read only notes when it started, and one
    watchdog timer per connection wakes up now and then (at the earliest moment
    a timeout could be due) and cancels a read that waited too long.  Only a
    read waiting for the client counts; time spent on a message does not.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        idle_timeout: float,
        total_timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + total_timeout
        self.task = asyncio.current_task()
        self.read_started: float | None = None  # loop time, while a read waits
        self.expired = False
        self.watchdog = self.loop.call_at(self._due(self.loop.time()), self._watch)

    def _due(self, now: float) -> float:
        start = now if self.read_started is None else self.read_started
        return min(start + self.idle_timeout, self.deadline)

    def _watch(self) -> None:
        now = self.loop.time()
        if self.read_started is None and now >= self.deadline:
            return  # busy past the deadline: the next read times out by itself
        due = self._due(now)
        if self.read_started is not None and now >= due and self.task is not None:
            self.expired = True
            self.task.cancel()
            return
        self.watchdog = self.loop.call_at(due, self._watch)

    def close(self) -> None:
        self.watchdog.cancel()
        self.writer.close()

    async def _read_chunk(self) -> bytes:
        """Next bytes from the client within the idle and session timeouts; EOFError at EOF."""
        if self.expired or self.loop.time() >= self.deadline:
            raise TimeoutError
        self.read_started = self.loop.time()
        try:
            chunk = await self.reader.read(READ_CHUNK)
        except asyncio.CancelledError:
            if not self.expired or self.task is None:
                raise
            self.task.uncancel()
            raise TimeoutError from None
        finally:
            self.read_started = None
        if not chunk:
            raise EOFError
        return chunk

    async def _fill(self) -> None:
        self.buf += await self._read_chunk()

    async def read_line(self) -> tuple[bytes, bool]:
        """Next line up to and including LF; (line, too_long).  Raises EOFError at EOF."""
        scanned = 0
        too_long = False
        while True:
            i = self.buf.find(b"\n", scanned)
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line, too_long or len(line) > MAX_LINE
            if len(self.buf) > MAX_LINE:
                too_long = True
                del self.buf[:-1]  # keep a possible CR for the CRLF check
            scanned = max(0, len(self.buf) - 1)
            await self._fill()

    async def read_data(self, max_size: int) -> tuple[bytearray, int]:
        """Read DATA up to CRLF.CRLF; (dot-stuffed content, size).

        Content is empty when the size exceeded ``max_size``: the rest is read
        and dropped so that it is never taken for commands.
        """
        # the CRLF that ended the DATA command is the first half of a possible terminator
        data = bytearray(b"\r\n")
        data += self.buf
        self.buf = bytearray()
        pos = 0
        dropped = 0
        while True:
            i = data.find(b"\r\n.\r\n", pos)
            if i >= 0:
                self.buf = data[i + 5 :]  # pipelined commands after the message
                del data[i + 2 :]
                del data[:2]
                size = dropped + len(data) if dropped else len(data)
                if dropped:
                    return bytearray(), size
                return data, size
            if len(data) - 2 + dropped > max_size:
                # oversize: forget what we have, keep only enough to find the terminator
                dropped += len(data) - 4
                del data[:-4]
            pos = max(0, len(data) - 4)
            data += await self._read_chunk()

    async def reply(self, text: str) -> None:
        self.writer.write(text.encode("utf-8", "surrogateescape") + b"\r\n")
        await self.writer.drain()


@dataclass
class ServerSettings:
    hostname: str
    max_message_size: int
    idle_timeout: float = 300.0
    total_timeout: float = 1800.0
    lmtp: bool = False  # RFC 2033: LHLO, and a reply per recipient after DATA


class SMTPServer:
    """Runs the SMTP dialogue of one connection against a :class:`Handler`."""

    def __init__(
        self,
        handler: Handler,
        settings: ServerSettings,
        busy: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.busy = busy  # marks message processing that a graceful stop waits for

    @property
    def direction(self) -> str:
        return getattr(self.handler, "direction", "other")

    def _count(self, stage: str, reply: str) -> None:
        code = reply[:3] if reply[:3].isdigit() else "other"
        metrics.FILTER_REPLIES.labels(self.direction, stage, code).inc()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        conn = Connection(reader, writer, s.idle_timeout, s.total_timeout)
        session = Session(peer=peer)
        env = Envelope()
        await conn.reply(f"220 {s.hostname} {'LMTP' if s.lmtp else 'ESMTP'} filtermail")
        # a mail transaction (MAIL until its end) is work a graceful stop lets finish:
        # Postfix's proxy session would otherwise answer its client 451 mid-message
        transaction = contextlib.ExitStack()
        in_transaction = False
        try:
            while True:
                raw, too_long = await conn.read_line()
                if too_long:
                    await conn.reply("500 5.5.2 Error: line too long")
                    continue
                if not raw.endswith(b"\r\n") or b"\r" in raw[:-2]:
                    # anti-smuggling: a line must end in CRLF and contain no other CR
                    await conn.reply("500 5.5.2 Error: bare CR or LF in command; closing")
                    return
                try:
                    line = raw[:-2].decode("utf-8")
                except UnicodeDecodeError:
                    await conn.reply("500 5.5.2 Error: command is not valid UTF-8")
                    continue
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                env = await self._command(conn, session, env, verb, arg)
                if env.mail_from is None and in_transaction:
                    transaction.close()
                    in_transaction = False
                elif env.mail_from is not None and not in_transaction:
                    transaction.enter_context(self.busy())
                    in_transaction = True
        except TimeoutError:
            log.info("%s: timeout, closing connection", peer)
            try:
                await conn.reply(f"421 4.4.2 {s.hostname} Error: timeout exceeded")
            except (ConnectionError, OSError):
                pass
        except (EOFError, ProtocolClose):
            pass
        finally:
            transaction.close()
            conn.close()

    async def _command(
        self, conn: Connection, session: Session, env: Envelope, verb: str, arg: str
    ) -> Envelope:
        s = self.settings
        if verb == "LHLO" or (verb == "EHLO" and not s.lmtp):
            if not arg.strip():
                await conn.reply(f"501 5.5.4 Syntax: {verb} hostname")
                return env
            session.helo = arg.strip()
            await conn.reply(
                f"250-{s.hostname}\r\n250-PIPELINING\r\n250-SIZE {s.max_message_size}\r\n"
                "250-8BITMIME\r\n250-SMTPUTF8\r\n250 DSN"
            )
            return Envelope()
        if verb in ("HELO", "EHLO") and s.lmtp:
            await conn.reply("500 5.5.1 Error: this is LMTP: LHLO")
            return env
        if verb == "HELO":
            if not arg.strip():
                await conn.reply("501 5.5.4 Syntax: HELO hostname")
                return env
            session.helo = arg.strip()
            await conn.reply(f"250 {s.hostname}")
            return Envelope()
        if verb == "MAIL":
            return await self._mail(conn, session, env, arg)
        if verb == "RCPT":
            return await self._rcpt(conn, session, env, arg)
        if verb == "DATA":
            return await self._data(conn, session, env, arg)
        if verb == "RSET":
            await conn.reply("250 2.0.0 OK")
            return Envelope()
        if verb == "NOOP":
            await conn.reply("250 2.0.0 OK")
            return env
        if verb == "QUIT":
            await conn.reply("221 2.0.0 Bye")
            raise ProtocolClose
        if verb == "VRFY":
            await conn.reply("252 2.0.0 Cannot VRFY; send some mail")
            return env
        if verb == "HELP":
            await conn.reply("214 2.0.0 See RFC 5321")
            return env
        if verb in ("EXPN", "ETRN", "TURN", "BDAT", "STARTTLS", "AUTH", "XCLIENT", "XFORWARD"):
            await conn.reply(f"502 5.5.1 Error: {verb} not implemented")
            return env
        await conn.reply("500 5.5.2 Error: command not recognized")
        return env

    async def _mail(self, conn: Connection, session: Session, env: Envelope, arg: str) -> Envelope:
        if env.mail_from is not None:
            await conn.reply("503 5.5.1 Error: nested MAIL command")
            return env
        if arg[:5].upper() != "FROM:":
            await conn.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return env
        parsed = parse_path(arg[5:])
        params = parse_params(parsed[1]) if parsed else None
        if parsed is None or params is None:
            await conn.reply("501 5.1.7 Bad sender address syntax")
            return env
        addr = parsed[0]
        for p in params:
            key, _, value = p.partition("=")
            if (
                key.upper() == "SIZE"
                and value.isdigit()
                and int(value) > self.settings.max_message_size
            ):
                await conn.reply("552 5.3.4 Message size exceeds fixed limit")
                return env
        if addr and ("@" not in addr or any(c in addr for c in " <>\t")):
            await conn.reply(f"500 Invalid from address <{addr}>")
            return env
        new = Envelope(mail_from=addr, mail_params=[p for p in params if _key(p) in MAIL_PARAMS])
        error = await self.handler.handle_mail(session, new, addr)
        if error:
            self._count("mail", error)
            await conn.reply(error)
            return env
        await conn.reply("250 2.1.0 OK")
        return new

    async def _rcpt(self, conn: Connection, session: Session, env: Envelope, arg: str) -> Envelope:
        if env.mail_from is None:
            await conn.reply("503 5.5.1 Error: need MAIL command")
            return env
        if arg[:3].upper() != "TO:":
            await conn.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return env
        parsed = parse_path(arg[3:])
        params = parse_params(parsed[1]) if parsed else None
        if parsed is None or params is None or not parsed[0]:
            await conn.reply("501 5.1.3 Bad recipient address syntax")
            return env
        addr = parsed[0]
        if "@" not in addr or any(c in addr for c in " <>\t"):
            await conn.reply(f"553 5.1.3 Invalid email address: <{addr}>")
            return env
        if len(env.rcpt_tos) >= MAX_RECIPIENTS:
            await conn.reply("452 4.5.3 Error: too many recipients")
            return env
        error = await self.handler.handle_rcpt(session, env, addr)
        if error:
            self._count("rcpt", error)
            await conn.reply(error)
            return env
        env.rcpt_tos.append(addr)
        env.rcpt_params.append([p for p in params if _key(p) in RCPT_PARAMS])
        await conn.reply("250 2.1.5 OK")
        return env

    async def _data(self, conn: Connection, session: Session, env: Envelope, arg: str) -> Envelope:
        if arg.strip():
            await conn.reply("501 5.5.4 Syntax: DATA")
            return env
        if env.mail_from is None:
            await conn.reply("503 5.5.1 Error: need MAIL command")
            return env
        if not env.rcpt_tos:
            await conn.reply("554 5.5.1 Error: no valid recipients")
            return env
        await conn.reply("354 End data with <CR><LF>.<CR><LF>")
        data, size = await conn.read_data(self.settings.max_message_size)
        if size > self.settings.max_message_size:
            log.info("%s: message of %d bytes refused: too big", session.peer, size)
            await conn.reply("552 5.3.4 Message exceeds maximum size")
            return Envelope()
        if has_bare_cr_or_lf(data):
            log.info("%s: message refused: bare CR or LF", session.peer)
            await conn.reply("500 5.6.0 Invalid DATA: bare CR or LF in message")
            return Envelope()
        content = dot_unstuff(data)
        del data
        try:
            with self.busy(), metrics.timed(metrics.FILTER_SECONDS, self.direction):
                result = await self.handler.handle_data(session, env, content)
        except Exception:
            log.exception("%s: handler failed", session.peer)
            result = "451 4.3.0 Local error in processing"
        for reply in [result] if isinstance(result, str) else result:
            self._count("data", reply)
        if self.settings.lmtp:
            replies = [result] * len(env.rcpt_tos) if isinstance(result, str) else result
            if len(replies) != len(env.rcpt_tos):
                log.error("%s: %d replies for %d recipients", session.peer, len(replies),
                          len(env.rcpt_tos))  # fmt: skip
                replies = ["451 4.3.0 Local error in processing"] * len(env.rcpt_tos)
            await conn.reply("\r\n".join(replies))
        else:
            await conn.reply(result if isinstance(result, str) else result[0])
        return Envelope()


def _key(param: str) -> str:
    return param.partition("=")[0].upper()
