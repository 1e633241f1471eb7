"""A small keep-alive HTTP/1.1 client that POSTs a body to one URL: the push notifier's.

The notifier needs nothing else (a short body, the status code back), and
aiohttp's client, loaded for it, cost the dict process ~8 MB RSS for good
(issue 11).  This one keeps up to ``limit`` requests in flight, reuses idle
connections for ``keepalive`` seconds, and bounds every request by
``timeout`` seconds and the answer's head and body by a size.
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


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()


class PostClient:
    def __init__(self, url: str, limit: int, timeout: float, keepalive: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.timeout = timeout
        self.keepalive = keepalive
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []

    async def post(self, body: bytes) -> int:
        """POST ``body``; the status code.  Raises OSError, TimeoutError or HTTPError."""
        async with self._slots:
            return await asyncio.wait_for(self._post(body), self.timeout)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    async def _post(self, body: bytes) -> int:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, body, reused=True)
            except _StaleConnection:
                pass  # closed by the server while idle: once more on a new connection
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None
        )
        return await self._exchange(_Connection(reader, writer), body, reused=False)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self.keepalive and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def _exchange(self, conn: _Connection, body: bytes, reused: bool) -> int:
        keep = False
        try:
            conn.writer.write(
                (
                    f"POST {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                    "Accept: */*\r\nContent-Type: application/octet-stream\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode("ascii")
                + body
            )
            await conn.writer.drain()
            first = await conn.reader.readline()
            if not first:
                if reused:
                    raise _StaleConnection()
                raise ConnectionError("connection closed without an answer")
            status, headers, version = await self._head(conn.reader, first)
            keep = await self._body(conn.reader, status, headers)
            keep = keep and version == "HTTP/1.1" and headers.get("connection") != "close"
            return status
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
                headers[name.strip().lower()] = value.strip().lower()
            if not 100 <= int(code) < 200:
                return int(code), headers, version
            line = await reader.readline()

    @staticmethod
    async def _body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> bool:
        """Read (and drop) the answer's body; True if the connection can be reused."""
        if status in (204, 304):
            return True
        if "chunked" in headers.get("transfer-encoding", ""):
            total = 0
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
                    return True
                await reader.readexactly(size + 2)  # the chunk and its CRLF
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise HTTPError("bad Content-Length") from None
            if not 0 <= length <= MAX_BODY:
                raise HTTPError("answer body too large")
            await reader.readexactly(length)
            return True
        # no framing: the body ends when the server closes
        data = await reader.read(MAX_BODY + 1)
        while data and len(data) <= MAX_BODY:
            more = await reader.read(MAX_BODY + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > MAX_BODY:
            raise HTTPError("answer body too large")
        return False
