"""A small keep-alive HTTP/1.1 client that POSTs bodies to one URL.

Its users are the push notifier (a short body, the status code back) and
filtermail's transport (a message to another relay's ``/mxdeliv``, the status,
a header field and the body of the answer back).  aiohttp's client, loaded for
the notifier, cost the dict process ~8 MB RSS for good (issue 11).  This one
keeps up to ``limit`` requests in flight, reuses idle connections for
``keepalive`` seconds, and bounds every request by ``timeout`` seconds and the
answer's head and body by a size.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.parse
from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # status line and header fields
MAX_BODY = 1024 * 1024  # the push service answers a few bytes


class HTTPError(ValueError):
    """The server's answer is not HTTP/1.x as this client understands it."""


class _StaleConnection(ConnectionError):
    """A reused idle connection the server had closed: nothing was answered."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lowercased; a repeated field: its last value
    body: bytes  # at most MAX_BODY


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()


class PostClient:
    def __init__(
        self,
        url: str,
        limit: int,
        timeout: float,
        keepalive: float = 60.0,
        *,
        tls: ssl.SSLContext | None = None,
        connect_to: str | None = None,
    ) -> None:
        """``tls``: the context for an https URL (default: verify against the system's
        CAs); ``connect_to``: the address to connect to instead of the URL's host
        (which stays the TLS server name and the Host field)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.connect_to = connect_to or self.host
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        https = parts.scheme == "https"
        self.tls = (tls or ssl.create_default_context()) if https else None
        # no SNI for an address (RFC 6066); the certificate is still checked against it
        self.server_name = self.host if https else None
        self.timeout = timeout
        self.keepalive = keepalive
        self.in_flight = 0  # requests waiting or running
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []

    async def post(self, body: bytes) -> int:
        """POST ``body``; the status code.  Raises OSError, TimeoutError or HTTPError."""
        return (await self.exchange(body)).status

    async def exchange(
        self, body: bytes, fields: tuple[tuple[str, str], ...] = (), timeout: float | None = None
    ) -> Answer:
        """POST ``body`` with extra header ``fields``; the answer.  Raises as post()."""
        if any(c in name + value for name, value in fields for c in "\r\n"):
            raise ValueError("a header field with CR or LF")  # it would end the field early
        self.in_flight += 1
        try:
            async with self._slots:
                return await asyncio.wait_for(self._post(body, fields), timeout or self.timeout)
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    async def _post(self, body: bytes, fields: tuple[tuple[str, str], ...]) -> Answer:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, body, fields, reused=True)
            except _StaleConnection:
                pass  # closed by the server while idle: once more on a new connection
        reader, writer = await asyncio.open_connection(
            self.connect_to, self.port, ssl=self.tls, server_hostname=self.server_name
        )
        return await self._exchange(_Connection(reader, writer), body, fields, reused=False)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self.keepalive and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def _exchange(
        self, conn: _Connection, body: bytes, fields: tuple[tuple[str, str], ...], reused: bool
    ) -> Answer:
        keep = False
        extra = "".join(f"{name}: {value}\r\n" for name, value in fields)
        try:
            conn.writer.write(
                (
                    f"POST {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                    "Accept: */*\r\nContent-Type: application/octet-stream\r\n"
                    f"{extra}Content-Length: {len(body)}\r\n\r\n"
                ).encode()
            )
            conn.writer.write(body)
            await conn.writer.drain()
            first = await conn.reader.readline()
            if not first:
                if reused:
                    raise _StaleConnection()
                raise ConnectionError("connection closed without an answer")
            status, headers, version = await self._head(conn.reader, first)
            keep, answer_body = await self._body(conn.reader, status, headers)
            closing = headers.get("connection", "").lower() == "close"
            keep = keep and version == "HTTP/1.1" and not closing
            return Answer(status, headers, answer_body)
        except (ConnectionResetError, BrokenPipeError):
            if reused:
                raise _StaleConnection() from None
            raise
        finally:
            if keep:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()

    @staticmethod
    async def _head(reader: asyncio.StreamReader, first: bytes) -> tuple[int, dict[str, str], str]:
        line, size = first, 0
        while True:  # 1xx answers (100 Continue) precede the real one
            version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise HTTPError(f"not an HTTP status line: {line[:100]!r}")
            headers: dict[str, str] = {}
            while True:
                field = await reader.readline()
                size += len(field)
                if size > MAX_HEAD:
                    raise HTTPError("answer head too large")
                if not field.endswith(b"\n"):
                    raise HTTPError("answer head cut short")
                if field in (b"\r\n", b"\n"):
                    break
                name, sep, value = field.decode("latin-1").partition(":")
                if not sep:
                    raise HTTPError(f"not a header field: {field[:100]!r}")
                headers[name.strip().lower()] = value.strip()
            if not 100 <= int(code) < 200:
                return int(code), headers, version
            line = await reader.readline()

    @staticmethod
    async def _body(
        reader: asyncio.StreamReader, status: int, headers: dict[str, str]
    ) -> tuple[bool, bytes]:
        """Read the answer's body; whether the connection can be reused, and the body."""
        if status in (204, 304):
            return True, b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            total, chunks = 0, []
            while True:
                size_line = await reader.readline()
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HTTPError(f"bad chunk size: {size_line[:100]!r}") from None
                total += size
                if total > MAX_BODY:
                    raise HTTPError("answer body too large")
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    return True, b"".join(chunks)
                chunks.append((await reader.readexactly(size + 2))[:-2])  # the chunk, CRLF
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise HTTPError("bad Content-Length") from None
            if not 0 <= length <= MAX_BODY:
                raise HTTPError("answer body too large")
            return True, await reader.readexactly(length)
        # no framing: the body ends when the server closes
        data = await reader.read(MAX_BODY + 1)
        while data and len(data) <= MAX_BODY:
            more = await reader.read(MAX_BODY + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > MAX_BODY:
            raise HTTPError("answer body too large")
        return False, data
