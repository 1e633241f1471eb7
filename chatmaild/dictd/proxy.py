"""Dovecot dict protocol (proxy dict, protocol v3.x of Dovecot 2.3) over a UNIX socket.

Each request is one LF-terminated line: a command letter, then TAB-separated
fields in Dovecot's tab-escaping (``\\001`` escapes).  Replies go out in request
order (no async ids).  Commands that expect a reply (LOOKUP, ITERATE, COMMIT,
COMMIT_ASYNC, and unknown commands) always get one; transaction commands
(BEGIN, SET, UNSET, ATOMIC_INC, TIMESTAMP, ROLLBACK) never do, so a fault in
them marks the transaction failed and its COMMIT answers ``F``.

Subclasses of :class:`DictDaemon` implement :meth:`lookup`, :meth:`iterate`
and :meth:`commit`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from chatmaild.common.service import Daemon

MAX_LINE = 64 * 1024  # Dovecot's own DICT_CLIENT_MAX_LINE_LENGTH
HEAD = 256  # bytes kept of an over-long line: enough for command letter and txid
OVERSIZE = b"\0oversize\0"  # marks a refused line; NUL never starts a real command

ESCAPE = "\x01"
_UNESCAPE = {"0": "\0", "1": "\x01", "t": "\t", "r": "\r", "n": "\n"}
_ESCAPE = {"\0": "\x010", "\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n"}

# iterate flags (Dovecot 2.3 lib-dict/dict.h)
ITER_RECURSE = 0x01
ITER_SORT_BY_KEY = 0x02
ITER_SORT_BY_VALUE = 0x04
ITER_NO_VALUE = 0x08
ITER_EXACT_KEY = 0x10
ITER_ASYNC = 0x20

log = logging.getLogger("chatmaild.dictd.proxy")


class ProtocolError(ValueError):
    """A request line that does not follow the dict protocol."""


def tabunescape(text: str) -> str:
    if ESCAPE not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ESCAPE:
            if i + 1 >= len(text) or text[i + 1] not in _UNESCAPE:
                raise ProtocolError("broken \\001 escape")
            out.append(_UNESCAPE[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


_NEEDS_ESCAPE = re.compile("[\0\x01\t\r\n]")


def tabescape(text: str) -> str:
    if not _NEEDS_ESCAPE.search(text):
        return text
    return "".join(_ESCAPE.get(c, c) for c in text)


def split_fields(text: str) -> list[str]:
    return [tabunescape(part) for part in text.split("\t")]


@dataclass
class Change:
    op: str  # "set", "unset" or "inc"
    key: str
    value: str | int | None = None


@dataclass
class Transaction:
    id: str
    user: str | None
    changes: list[Change] = field(default_factory=list)
    failed: str | None = None  # why it can only answer F at commit


LookupResult = str | list[str] | None


class DictDaemon(Daemon):
    """A dict server: protocol here, meaning in subclasses."""

    # answer for lookups nobody handles: not found
    async def lookup(self, key: str, user: str | None) -> LookupResult:
        return None

    async def iterate(
        self, flags: int, max_rows: int, paths: list[str], user: str | None
    ) -> AsyncIterator[tuple[str, str]] | Iterable[tuple[str, str]]:
        return ()

    async def commit(self, txn: Transaction) -> bool:
        """Apply a transaction's changes; True = O, False = F."""
        return False

    # ------------------------------------------------------------ protocol

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = DictConnection(self, reader, writer)
        await conn.serve()


class DictConnection:
    """One Dovecot client connection: its HELLO user and its open transactions."""

    def __init__(
        self, daemon: DictDaemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.daemon = daemon
        self.reader = reader
        self.writer = writer
        self.user: str | None = None
        self.transactions: dict[str, Transaction] = {}

    async def read_line(self) -> bytes | None:
        """One request line without its LF, or None at EOF.

        A line over MAX_LINE is consumed whole and returned as :data:`OVERSIZE`
        plus its first bytes, so only that request fails and the stream stays in step.
        """
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None  # EOF, possibly mid-line: nothing complete to answer
        except asyncio.LimitOverrunError:
            return OVERSIZE + await self._discard_line()
        if len(line) > MAX_LINE + 1:
            return OVERSIZE + line[:HEAD]
        return line[:-1]

    async def _discard_line(self) -> bytes:
        """Skip the rest of an over-long line; return its first bytes (command, txid)."""
        head = b""
        while True:
            try:
                rest = await self.reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as e:
                chunk = await self.reader.read(max(e.consumed, 1))
            except asyncio.IncompleteReadError as e:
                return (head + e.partial)[:HEAD]  # EOF ends the connection next read
            else:
                return (head + rest)[:HEAD]
            if len(head) < HEAD:
                head += chunk[: HEAD - len(head)]

    async def write(self, *lines: str) -> None:
        data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
        self.writer.write(data)
        await self.writer.drain()

    async def serve(self) -> None:
        while not self.daemon.stopping.is_set():
            raw = await self.read_line()
            if raw is None:
                return
            with self.daemon.request():
                if raw.startswith(OVERSIZE):
                    replies = self.refuse_oversize(raw[len(OVERSIZE) :])
                else:
                    text = raw.decode("utf-8", "surrogateescape").rstrip("\r")
                    if not text:
                        continue  # empty lines carry no command
                    replies = await self.dispatch(text)
                if replies:
                    await self.write(*replies)

    def refuse_oversize(self, head: bytes) -> list[str]:
        text = head.decode("utf-8", "surrogateescape")
        self.daemon.log.warning(
            "dict request line over %d bytes refused: %r...", MAX_LINE, text[:40]
        )
        return self.failure(text[:1], text[1:])

    async def dispatch(self, line: str) -> list[str]:
        cmd, rest = line[0], line[1:]
        handler = COMMANDS.get(cmd)
        if handler is None:
            self.daemon.log.warning("unknown dict command %r", cmd)
            return ["F"]
        try:
            return await handler(self, rest)
        except ProtocolError as e:
            self.daemon.log.warning("malformed dict request %r: %s", line[:200], e)
        except Exception:
            self.daemon.log.exception("dict request %r failed", line[:200])
        return self.failure(cmd, rest)

    def failure(self, cmd: str, rest: str) -> list[str]:
        """The answer to a request that could not be carried out.

        Commands with a reply get F; a failed change poisons its transaction so
        the later COMMIT answers F instead of silently committing less.
        """
        txid = rest.split("\t", 1)[0]
        if cmd in ("C", "D"):
            self.transactions.pop(txid, None)
            return [f"{'A' if cmd == 'D' else ''}F{txid}"]
        if cmd in REPLYING or cmd not in COMMANDS:
            return ["F"]
        if cmd in "SUAT":
            txn = self.transactions.get(txid)
            if txn is None:
                self.transactions[txid] = Transaction(txid, self.user, failed="bad request")
            elif not txn.failed:
                txn.failed = "bad request"
        return []

    # ------------------------------------------------------------ commands

    async def cmd_hello(self, rest: str) -> list[str]:
        # H<major>\t<minor>\t<value type>\t<user>\t<dict name>
        parts = split_fields(rest)
        if len(parts) >= 4 and parts[3]:
            self.user = parts[3]
        return []

    async def cmd_lookup(self, rest: str) -> list[str]:
        parts = split_fields(rest)
        key = parts[0]
        user = parts[1] if len(parts) > 1 and parts[1] else self.user
        if not key:
            raise ProtocolError("LOOKUP without key")
        result = await self.daemon.lookup(key, user)
        if result is None:
            return ["N"]
        if isinstance(result, list):
            if not result:
                return ["N"]
            return ["O" + "\t".join(tabescape(v) for v in result)]
        return ["O" + tabescape(result)]

    async def cmd_iterate(self, rest: str) -> list[str]:
        parts = split_fields(rest)
        if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
            raise ProtocolError("ITERATE needs <flags> <max_rows> <path>")
        flags, max_rows = int(parts[0]), int(parts[1])
        paths = [p for p in parts[2:] if p]
        # Dovecot 2.3.17+ appends the username after the path
        user = self.user
        if len(paths) > 1 and not paths[-1].startswith(("shared/", "priv/")):
            user = paths.pop()
        rows: list[str] = []
        result = self.daemon.iterate(flags, max_rows, paths, user)
        if inspect.isawaitable(result):  # a coroutine returning rows
            result = await result
        if hasattr(result, "__aiter__"):  # or an async generator
            async for key, value in result:  # type: ignore[union-attr]
                if max_rows and len(rows) >= max_rows:
                    break
                rows.append(self._row(flags, key, value))
        else:
            for key, value in result:  # type: ignore[union-attr]
                if max_rows and len(rows) >= max_rows:
                    break
                rows.append(self._row(flags, key, value))
        rows.append("")  # end of iteration
        return rows

    @staticmethod
    def _row(flags: int, key: str, value: str) -> str:
        if flags & ITER_NO_VALUE:
            return "O" + tabescape(key) + "\t"
        return "O" + tabescape(key) + "\t" + tabescape(value)

    def _txn(self, txid: str) -> Transaction:
        txn = self.transactions.get(txid)
        if txn is None:
            raise ProtocolError(f"unknown transaction id {txid!r}")
        return txn

    async def cmd_begin(self, rest: str) -> list[str]:
        parts = split_fields(rest)
        txid = parts[0]
        if not txid.isdigit():
            raise ProtocolError(f"invalid transaction id {txid!r}")
        user = parts[1] if len(parts) > 1 and parts[1] else self.user
        txn = Transaction(txid, user)
        if txid in self.transactions:
            # a reused id is a client bug; the new one can only fail
            txn.failed = "transaction id already open"
        self.transactions[txid] = txn
        return []

    async def _change(self, rest: str, op: str, nfields: int) -> list[str]:
        parts = split_fields(rest)
        txn = self.transactions.get(parts[0])
        if txn is None:
            # remember the fault so the COMMIT of this id answers F, not silence
            txn = Transaction(parts[0], self.user, failed="unknown transaction id")
            self.transactions[parts[0]] = txn
            self.daemon.log.warning("dict %s for unknown transaction %r", op, parts[0])
            return []
        if len(parts) != nfields or txn.failed:
            txn.failed = txn.failed or f"malformed {op}"
            return []
        if op == "inc":
            try:
                txn.changes.append(Change(op, parts[1], int(parts[2])))
            except ValueError:
                txn.failed = "ATOMIC_INC needs an integer"
        else:
            txn.changes.append(Change(op, parts[1], parts[2] if nfields == 3 else None))
        return []

    async def cmd_set(self, rest: str) -> list[str]:
        return await self._change(rest, "set", 3)

    async def cmd_unset(self, rest: str) -> list[str]:
        return await self._change(rest, "unset", 2)

    async def cmd_atomic_inc(self, rest: str) -> list[str]:
        return await self._change(rest, "inc", 3)

    async def cmd_timestamp(self, rest: str) -> list[str]:
        return []  # our stores keep no per-transaction timestamps

    async def cmd_hide_log_values(self, rest: str) -> list[str]:
        return []

    async def cmd_rollback(self, rest: str) -> list[str]:
        self.transactions.pop(split_fields(rest)[0], None)
        return []

    async def _commit(self, rest: str, async_reply: bool) -> list[str]:
        txid = split_fields(rest)[0]
        txn = self.transactions.pop(txid, None)
        prefix = "A" if async_reply else ""
        if txn is None:
            self.daemon.log.warning("dict commit of unknown transaction %r", txid)
            return [f"{prefix}F{txid}\tunknown transaction"]
        if txn.failed:
            self.daemon.log.warning("dict transaction %s failed: %s", txid, txn.failed)
            return [f"{prefix}F{txid}\t{tabescape(txn.failed)}"]
        try:
            ok = await self.daemon.commit(txn)
        except Exception:
            self.daemon.log.exception("dict commit failed")
            ok = False
        return [f"{prefix}{'O' if ok else 'F'}{txid}"]

    async def cmd_commit(self, rest: str) -> list[str]:
        return await self._commit(rest, async_reply=False)

    async def cmd_commit_async(self, rest: str) -> list[str]:
        return await self._commit(rest, async_reply=True)


COMMANDS = {
    "H": DictConnection.cmd_hello,
    "L": DictConnection.cmd_lookup,
    "I": DictConnection.cmd_iterate,
    "B": DictConnection.cmd_begin,
    "S": DictConnection.cmd_set,
    "U": DictConnection.cmd_unset,
    "A": DictConnection.cmd_atomic_inc,
    "T": DictConnection.cmd_timestamp,
    "V": DictConnection.cmd_hide_log_values,
    "R": DictConnection.cmd_rollback,
    "C": DictConnection.cmd_commit,
    "D": DictConnection.cmd_commit_async,
}
# commands whose client waits for an answer; a failure in them answers F
REPLYING = frozenset("LICD")
