"""Time and size limits around one HTTP connection, whatever server library parses it.

aiohttp bounds each request line and header field, the number of header fields
and the idle time between keep-alive requests, but not the time a client takes
to send its first request, nor how long a connection may stay open.  A
:class:`ConnectionGuard` sits between the transport and the library's protocol
and aborts the connection when

- the first request header is not complete ``header_timeout`` seconds after
  the connection (after its TLS handshake) was made, or is larger than
  ``max_header_bytes``;
- the connection is open ``lifetime`` seconds, whatever it does (a client that
  stops reading a response would otherwise hold it forever).
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

log = logging.getLogger("chatmail-newemail")
HEADER_ENDS = (b"\r\n\r\n", b"\n\n")


class ConnectionGuard(asyncio.Protocol):
    def __init__(
        self,
        inner: asyncio.Protocol,
        *,
        header_timeout: float,
        lifetime: float,
        max_header_bytes: int,
    ) -> None:
        self.inner = inner
        self.header_timeout = header_timeout
        self.lifetime = lifetime
        self.max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._life_timer: asyncio.TimerHandle | None = None
        self._header_seen = 0  # bytes of the first request received so far
        self._tail = b""  # the last bytes before this chunk: an end may straddle chunks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(
            self.header_timeout, self._abort, "no complete request header in time"
        )
        self._life_timer = loop.call_later(self.lifetime, self._abort, "connection open too long")
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None and not self._first_header(data):
            return
        self.inner.data_received(data)

    def _first_header(self, data: bytes) -> bool:
        """Track the first request header; False if the connection was aborted."""
        window = self._tail + data
        ends = [i + len(end) for end in HEADER_ENDS if (i := window.find(end)) >= 0]
        length = self._header_seen - len(self._tail) + (min(ends) if ends else len(window))
        if length > self.max_header_bytes:
            self._abort("request header too large")
            return False
        if ends:
            assert self._header_timer is not None
            self._header_timer.cancel()
            self._header_timer = None
        else:
            self._header_seen += len(data)
            self._tail = window[-3:]
        return True

    def _abort(self, why: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            peer = self.transport.get_extra_info("peername")
            log.debug("closing connection from %s: %s", peer[0] if peer else "?", why)
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._life_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._life_timer = None
        self.transport = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
