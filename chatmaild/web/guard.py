"""Time and size limits around one HTTP connection, whatever server library parses it.

aiohttp bounds each request line and header field and the idle time between
keep-alive requests, but not the time a client takes to send its first
request, nor how long a connection may stay open, nor (aiohttp 3.11's C
parser ignores ``max_headers``) how many header fields one request has.  A
:class:`ConnectionGuard` sits between the transport and the library's
protocol, is told by the application when a request reaches it
(:meth:`request_started`), and aborts the connection when

- no request arrived ``header_timeout`` seconds after the connection (after
  its TLS handshake) was made;
- more than ``max_request_bytes`` arrived since the last request started
  (a header plus the largest body accepted), whatever the parser makes of them;
- the connection is open ``lifetime`` seconds, whatever it does (a client that
  stops reading a response would otherwise hold it forever).
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

log = logging.getLogger("chatmail-newemail")

# the library's protocol object of each open connection -> its guard
_guards: dict[int, ConnectionGuard] = {}


def guard_of(protocol: object) -> ConnectionGuard | None:
    """The guard around ``protocol`` (aiohttp's ``request.protocol``), if any."""
    return _guards.get(id(protocol))


class ConnectionGuard(asyncio.Protocol):
    def __init__(
        self,
        inner: asyncio.Protocol,
        *,
        header_timeout: float,
        lifetime: float,
        max_request_bytes: int,
    ) -> None:
        self.inner = inner
        self.header_timeout = header_timeout
        self.lifetime = lifetime
        self.max_request_bytes = max_request_bytes
        self.transport: asyncio.Transport | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._life_timer: asyncio.TimerHandle | None = None
        self._received = 0  # bytes since the last request started

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(
            self.header_timeout, self._abort, "no complete request header in time"
        )
        self._life_timer = loop.call_later(self.lifetime, self._abort, "connection open too long")
        _guards[id(self.inner)] = self
        self.inner.connection_made(transport)

    def request_started(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._received = 0

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_request_bytes:
            self._abort("request too large")
            return
        self.inner.data_received(data)

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
        _guards.pop(id(self.inner), None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
