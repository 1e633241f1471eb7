"""A small HTTPS/1.1 server for the public web port: asyncio, TLS on memory BIOs, h11.

Why not aiohttp: its import alone costs 18-25 MB of a process whose whole job
is a handful of pages (README, "The web port"); h11 (Debian's python3-h11) is
the maintained HTTP/1.1 state machine without I/O, and costs under 1 MB.

Every connection goes through the same steps, each bounded:

1. **accepted**: counted against ``max_connections`` and ``max_per_source``
   (refused at once with a reset); holds a socket and this small object only,
   no TLS state, until the client's first byte arrives (``first_byte_timeout``);
2. **TLS handshake**: needs a free slot (``max_handshakes`` in progress) and a
   token of the source's handshake rate; ``handshake_timeout``; with
   ``queue_handshakes`` a connection finding no free slot waits for one (reading
   paused, within the same timeout) instead of being refused: port 993's devices
   all come back at once after a restart;
3. **HTTP**: h11 parses at most ``max_request_bytes`` per request (header and
   body); the header must be complete ``request_timeout`` after the handshake
   or the previous response; request line and each field at most
   ``max_line_bytes``, at most ``max_header_fields`` fields; a body above
   ``max_body_bytes`` gets 413 unread; the connection lives ``lifetime`` at most.

Decrypted data is read in 16 KiB pieces and dropped as soon as h11 has parsed
it, so an idle TLS connection keeps only OpenSSL's session state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import gc
import http
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

import h11

from chatmaild.web import clienthello
from chatmaild.web.limits import TOO_MANY_HANDSHAKES, Admission, RefusalLog, source_of
from chatmaild.web.tunnel import Backend, proxy_v1, proxy_v2

READ_CHUNK = 16 * 1024
WRITE_CHUNK = 64 * 1024
# after this many connections at once, the memory they took is handed back to the
# system once at most TRIM_BELOW are left (see HttpsServer.crowd_gone)
TRIM_AFTER = 256
TRIM_BELOW = 16
# and, however few at once, after every TRIM_EVERY closed connections (at most once
# a TRIM_INTERVAL): a steady stream of TLS handshakes leaves glibc's heap a little
# more fragmented each time (0.1-0.3 KB a handshake on Debian 12, issue 24)
TRIM_EVERY = 1000
TRIM_INTERVAL = 60.0


# bytes kept of a connection waiting for a handshake slot: a ClientHello (a
# post-quantum key share makes it ~1.8 KB), not what a flood would pile up
QUEUED_HELLO = 8192
# a port 443 mail client refused for a limit: its protocol's own refusal as greeting
MAIL_REFUSALS = {"imap": "* BYE [UNAVAILABLE] {}\r\n", "smtp": "421 4.7.0 {}\r\n"}


@dataclass(frozen=True)
class Settings:
    first_byte_timeout: float = 5.0
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0
    lifetime: float = 300.0
    max_line_bytes: int = 8190
    max_header_fields: int = 32
    max_body_bytes: int = 64 * 1024
    max_request_bytes: int = 80 * 1024
    linger: float = 2.0
    upload_grace: float = 30.0  # an upload's time beyond its size at UPLOAD_MIN_RATE


@dataclass
class Request:
    method: str
    path: str  # percent-decoded, without the query
    query: str
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    remote: str  # the client's IP address
    local: tuple[str, int]  # the address and port the client connected to
    content_length: int = 0
    # every header field as it came, in order (lower-case names): repeats stay apart
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def host(self) -> str | None:
        return self.headers.get("host")


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # a file to send instead of body: the server closes it
    file: BinaryIO | None = None
    file_size: int = 0


App = Callable[[Request], Awaitable[Response]]


class UploadSink(Protocol):
    """Where the body of one upload goes, piece by piece."""

    def feed(self, data: bytes) -> Response | None:
        """Take a piece; an answer refuses the request (the rest is not read)."""

    async def finish(self) -> Response:
        """The body is complete: the answer."""

    def discard(self) -> None:
        """The request ends without an answer (connection lost, too slow, refused)."""


class Upload(Protocol):
    """A POST route whose body is streamed to a sink instead of dropped (``/mxdeliv``)."""

    max_body: int  # bytes; Content-Length is required and at most this
    max_header_fields: int

    def begin(self, request: Request) -> UploadSink | Response:
        """A sink for the body of ``request``, or the answer refusing it from its head."""

    def refusal(self, status: int, why: str) -> Response:
        """The route's own answer to what the server refuses (411, 413, 408)."""


# an upload must keep this pace (bytes a second) after a grace time, or gets 408
UPLOAD_MIN_RATE = 32 * 1024


def _date() -> str:
    return email.utils.formatdate(usegmt=True)


class HttpsServer:
    """Serves ``app`` over HTTPS with the limits of ``settings`` and ``admission``;
    plain HTTP when ``tls`` is None (port 80).  ``tls`` may be replaced while serving
    (a renewed certificate): connections made later use the new one."""

    def __init__(
        self,
        app: App,
        tls: ssl.SSLContext | None,
        log: logging.Logger,
        settings: Settings | None = None,
        admission: Admission | None = None,
        common_headers: dict[str, str] | None = None,
        refusals: RefusalLog | None = None,
        mail_routes: dict[str, tuple[str, int]] | None = None,
        uploads: dict[str, Upload] | None = None,
        upgrades: dict[str, tuple[str, int]] | None = None,
        terminate_to: tuple[str, int] | None = None,
        queue_handshakes: bool = False,
    ) -> None:
        """``mail_routes``: ALPN name -> (host, port) of the mail server that takes a
        connection asking for it (port 443's IMAP and SMTP), tunnelled unchanged.
        ``upgrades``: path -> (host, port) of the plain HTTP server that takes a GET
        with an ``Upgrade`` header there (the iroh relay's /relay): the request and
        all that follows go there decrypted, after a PROXY line naming the client.
        ``terminate_to``: (host, port) that takes every connection once its TLS
        handshake is done, decrypted, after a PROXY v2 header naming the client and
        its TLS (port 993's IMAP front: no HTTP is spoken)."""
        self.app = app
        self.terminate_to = terminate_to
        self.queue_handshakes = queue_handshakes
        self.waiting: collections.deque[Connection] = collections.deque()
        self.mail_routes = mail_routes or {}
        self.upgrades = upgrades or {}
        self.uploads = uploads or {}
        self.tls = tls
        self.log = log
        self.settings = settings or Settings()
        self.admission = admission or Admission()
        self.refusals = refusals or RefusalLog(log)
        self.common_headers = common_headers or {}
        self.connections: set[Connection] = set()
        self.peak = 0  # most connections at once since the memory was last handed back
        self.closed_since_trim = 0
        self.last_trim = time.monotonic()
        self.stopping = False
        self._ticker: asyncio.TimerHandle | None = None

    def protocol(self) -> Connection:
        if self._ticker is None:
            self._tick()
        return Connection(self)

    def _tick(self) -> None:
        self.refusals.tick()
        if (
            self.closed_since_trim >= TRIM_EVERY
            and time.monotonic() - self.last_trim >= TRIM_INTERVAL
        ):
            self.give_back_heap()
        self._ticker = asyncio.get_running_loop().call_later(10.0, self._tick)

    def handshake_ended(self) -> None:
        """A handshake slot is free: the longest-waiting connection takes it."""
        self.admission.end_handshake()
        while self.waiting:
            conn = self.waiting.popleft()
            if conn.transport is not None and conn.queued is not None:
                asyncio.get_running_loop().call_soon(conn.resume_queued)
                return

    def opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.peak = max(self.peak, len(self.connections))

    def closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.closed_since_trim += 1
        if len(self.connections) <= TRIM_BELOW and self.peak >= TRIM_AFTER and not self.stopping:
            self.peak = len(self.connections)
            asyncio.get_running_loop().call_later(1.0, self.crowd_gone)

    def crowd_gone(self) -> None:
        """After a crowd of connections: hand the freed heap back to the system."""
        self.connections = set(self.connections)  # a set keeps the table of its largest size
        gc.collect()  # cycles of the connections (h11's state machines) wait for no allocation
        self.give_back_heap()

    def give_back_heap(self) -> None:
        """glibc keeps freed memory below the top of its heap for reuse; after
        thousands of connections that is megabytes the process would hold for
        good.  malloc_trim returns the free pages (~1 ms)."""
        self.closed_since_trim, self.last_trim = 0, time.monotonic()
        try:
            import ctypes  # only once there was traffic: 0.6 MB that a quiet relay never pays

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now, busy ones after their response (``timeout`` at most)."""
        self.stopping = True
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
        deadline = time.monotonic() + timeout
        while any(c.task is not None for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort("server stopping")
        if self._ticker is not None:
            self._ticker.cancel()
        self.refusals.flush()


class Connection(asyncio.Protocol):
    """One client connection: waiting for its first byte, in its handshake, or HTTP."""

    __slots__ = (
        "server",
        "transport",
        "source",
        "remote",
        "local",
        "tls",
        "bio_in",
        "bio_out",
        "http",
        "handshaking",
        "received",
        "task",
        "writable",
        "lingering",
        "timer",
        "life_timer",
        "pending",
        "hello",
        "backend",
        "tunnel_source",
        "sink",
        "request_limit",
        "early",
        "queued",
        "refusal",
    )

    def __init__(self, server: HttpsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.source = ""
        self.remote = ""
        self.local: tuple[str, int] = ("", 0)
        self.tls: ssl.SSLObject | None = None
        self.bio_in: ssl.MemoryBIO | None = None
        self.bio_out: ssl.MemoryBIO | None = None
        self.http: h11.Connection | None = None
        self.handshaking = False
        self.received = 0  # bytes of the current request
        self.task: asyncio.Task | None = None
        self.writable: asyncio.Event | None = None
        self.lingering = False
        self.timer: asyncio.TimerHandle | None = None
        self.life_timer: asyncio.TimerHandle | None = None
        self.pending: Request | None = None
        self.hello: bytes | None = None  # a ClientHello so far, while its ALPN decides
        self.backend: Backend | None = None  # a mail tunnel's server end
        self.tunnel_source = ""  # counted as a tunnel of this source
        self.sink: UploadSink | None = None  # an upload's body goes here
        self.request_limit = server.settings.max_request_bytes  # an upload's is larger
        self.early = b""  # an upgrade's bytes that came before its backend answered
        self.queued: bytes | None = None  # bytes of a connection waiting for a handshake slot
        self.refusal = b""  # a refused mail tunnel's words, said once our TLS is up

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.remote = str(peer[0]) if isinstance(peer, tuple) else "local"
        self.local = (str(sock[0]), int(sock[1])) if isinstance(sock, tuple) else ("", 0)
        self.source = source_of(self.remote)
        refused = self.server.admission.connect(self.source)
        if refused is not None:
            self.server.refusals.note(refused, self.source)
            self.source = ""  # not counted
            transport.abort()
            return
        self.server.opened(self)
        s = self.server.settings
        loop = asyncio.get_running_loop()
        self.life_timer = loop.call_later(s.lifetime, self.abort, "connection open too long")
        self._set_timer(s.first_byte_timeout, "no data in time")

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.timer, self.life_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.life_timer = None
        if self.handshaking:
            self.handshaking = False
            self.server.handshake_ended()
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()
        self.backend = None
        if self.tunnel_source:
            self.server.admission.close_tunnel(self.tunnel_source)
            self.tunnel_source = ""
        if self.source:
            self.server.admission.disconnect(self.source)
            self.source = ""
        self.server.closed(self)
        self._drop_sink()
        if self.task is not None:
            self.task.cancel()
        if self.writable is not None:
            self.writable.set()
        self.transport = None
        self.tls = self.bio_in = self.bio_out = None
        self.http = None

    def pause_writing(self) -> None:
        if self.backend is not None:
            self.backend_paused_reading(True)
            return
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend_paused_reading(False)
            return
        if self.writable is not None:
            self.writable.set()

    def eof_received(self) -> bool:
        if self.tunnel_source:
            return False  # the client is done: so is its tunnel (connection_lost)
        if self.http is not None and not self.lingering:
            with contextlib.suppress(h11.RemoteProtocolError):
                self.http.receive_data(b"")
            if self.task is None:
                self._process()
        if self.task is None:
            self.close()
        return True  # half-open: a response in flight is still sent

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self.tunnel_source:
            if self.tls is not None:  # an upgraded request's: decrypted for its backend
                assert self.bio_in is not None
                self.bio_in.write(data)
                self._read_tls()
            elif self.backend is not None and self.backend.transport is not None:
                self.backend.transport.write(data)
            return
        if self.server.tls is None:  # plain HTTP
            if self.http is None and not self.lingering:
                self._wait_for_request()  # the first byte: now the header's time
            self._http_data(data)
            return
        if self.tls is None and self.server.mail_routes:
            decided = self._route_by_alpn(data)
            if decided is None:
                return
            data = decided
        if self.queued is not None:  # still waiting for a handshake slot
            self.queued += data
            if len(self.queued) > QUEUED_HELLO:
                self.abort("too much data before the TLS handshake")
            return
        if self.tls is None and not self._start_tls(data):
            return
        assert self.bio_in is not None and self.tls is not None
        self.bio_in.write(data)
        if self.handshaking:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, OSError) as e:
                self._flush()
                self.abort(f"TLS handshake failed: {e}")
                return
            self._flush()
            self.handshaking = False
            self.server.handshake_ended()
            if self.server.terminate_to is not None:
                # the IMAP front: what the client sends next is Dovecot's
                self._open_tunnel(self.server.terminate_to, b"")
            elif self.refusal:
                self._send(self.refusal)
                self.close()
                return
            else:
                self._wait_for_request()
        self._read_tls()

    # ------------------------------------------------------------ port 443's mail

    def _route_by_alpn(self, data: bytes) -> bytes | None:
        """Gather the ClientHello; a mail protocol's goes into a tunnel (None), any other
        is returned whole for our own TLS."""
        if self.hello is None:
            self.hello = b""
            self._set_timer(self.server.settings.handshake_timeout, "ClientHello not in time")
        self.hello += data
        offered = clienthello.offered_alpn(self.hello)
        if offered is None:
            return None  # more to come
        first, self.hello = self.hello, b""
        protocol = next((p for p in offered if p in self.server.mail_routes), None)
        if protocol is None:
            return first
        refused = self._open_tunnel(self.server.mail_routes[protocol], first, tls_refusal=True)
        if refused is None:
            return None
        # the mail server's TLS is not ours to end, but our own handshake lets the
        # client read why in its protocol's words rather than see a dropped handshake
        self.refusal = MAIL_REFUSALS.get(protocol, "{}\r\n").format(refused).encode()
        return first

    def _open_tunnel(
        self,
        route: tuple[str, int],
        first: bytes,
        unreachable: bytes | None = None,
        tls_refusal: bool = False,
    ) -> str | None:
        """From now on this connection is a tunnel to ``route`` (which gets ``first``
        first); ``unreachable``: the answer to send when the backend is not there.
        Refused: why (with ``tls_refusal`` the caller says it, otherwise it is said)."""
        refused = self.server.admission.open_tunnel(self.source)
        if refused is not None:
            self.server.refusals.note(refused, self.source)
            if tls_refusal:
                return refused
            if self.server.terminate_to is not None:
                self._bye(refused)
            elif unreachable is not None:
                self._refuse(503, refused)
            else:
                self.abort(refused)
            return refused
        # a mail client's connection from now on: not one of the pages' budget, no
        # page timers (an IDLE lasts hours; the mail server keeps its own timeouts)
        self.tunnel_source = self.source
        self.server.admission.disconnect(self.source)
        self.source = ""
        self._cancel_timer()
        if self.life_timer is not None:
            self.life_timer.cancel()
            self.life_timer = None
        assert self.transport is not None
        self.transport.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._connect(route, first, unreachable))
        return None

    async def _connect(
        self, route: tuple[str, int], first: bytes, unreachable: bytes | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            # from the backend's own address: Dovecot trusts PROXY headers from that
            # address alone (haproxy_trusted_networks), and a local relay on 127.0.0.2
            # would otherwise reach it from 127.0.0.1
            transport, backend = await asyncio.wait_for(
                loop.create_connection(lambda: Backend(self), *route, local_addr=(route[0], 0)),
                timeout=10,
            )
        except (OSError, TimeoutError) as e:
            self.server.refusals.note(f"backend {route[0]}:{route[1]} unreachable ({e})",
                                      self.remote)  # fmt: skip
            if self.server.terminate_to is not None:
                self._bye("IMAP server not reachable, try again later")
            elif unreachable is not None and self.tls is not None:
                self._send(unreachable)
                self.close()
            else:
                self.abort("backend unreachable")
            return
        finally:
            self.task = None
        if self.transport is None or self.transport.is_closing():
            transport.close()
            return
        self.backend = backend
        client = (self.remote, self._remote_port())
        if self.server.terminate_to is not None and self.tls is not None:
            header = proxy_v2(client, self.local, self.tls.version() or "TLS")
        else:
            header = proxy_v1(client, self.local)
        transport.write(header + first + self.early)
        self.early = b""
        self.transport.resume_reading()

    def _bye(self, why: str) -> None:
        """The IMAP front's refusal, in IMAP's own words (RFC 9051's untagged BYE
        as a greeting): the client learns why, not just a closed connection."""
        self._send(MAIL_REFUSALS["imap"].format(why).encode())
        self.close()

    def _remote_port(self) -> int:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return int(peer[1]) if isinstance(peer, tuple) else 0

    def backend_data(self, data: bytes) -> None:
        if self.tls is not None:
            self._send(data)
        elif self.transport is not None:
            self.transport.write(data)

    def backend_lost(self) -> None:
        self.backend = None
        self.close()  # after what the server sent last

    def backend_paused(self, paused: bool) -> None:
        """The mail server reads slowly: stop reading from the client meanwhile."""
        if self.transport is not None and not self.transport.is_closing():
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def backend_paused_reading(self, paused: bool) -> None:
        """The client reads slowly: stop reading from the mail server meanwhile."""
        t = self.backend.transport if self.backend is not None else None
        if t is not None and not t.is_closing():
            (t.pause_reading if paused else t.resume_reading)()

    def _upgrade(self, route: tuple[str, int], event: h11.Request) -> None:
        """A GET with an Upgrade header on one of ``upgrades``' paths: its request and
        the rest of the connection go to that server, decrypted."""
        assert self.http is not None
        head = b"%s %s HTTP/1.1\r\n" % (event.method, event.target) + b"".join(
            b"%s: %s\r\n" % (n, v) for n, v in event.headers.raw_items()
        )
        trailing = self.http.trailing_data[0]
        self.http = None
        unreachable = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                       b"Connection: close\r\n\r\n")  # fmt: skip
        self._open_tunnel(route, head + b"\r\n" + trailing, unreachable)

    def _to_backend(self, data: bytes) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.write(data)
            return
        self.early += data
        if len(self.early) > self.server.settings.max_request_bytes:
            self.abort("too much data before the backend answered")

    # ------------------------------------------------------------ TLS

    def _start_tls(self, data: bytes) -> bool:
        """Begin the handshake (True); False: refused, or waiting for a slot with
        ``data`` kept (queue_handshakes)."""
        refused = self.server.admission.start_handshake(self.source)
        if refused == TOO_MANY_HANDSHAKES and self.server.queue_handshakes:
            assert self.transport is not None
            self.queued = data
            self.transport.pause_reading()
            self.server.waiting.append(self)
            self._set_timer(self.server.settings.handshake_timeout, "no TLS handshake slot in time")
            return False
        if refused is not None:
            self.server.refusals.note(refused, self.source)
            self.abort(refused)
            return False
        assert self.server.tls is not None
        self.handshaking = True
        self.bio_in, self.bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = self.server.tls.wrap_bio(self.bio_in, self.bio_out, server_side=True)
        self._set_timer(self.server.settings.handshake_timeout, "TLS handshake not done in time")
        return True

    def resume_queued(self) -> None:
        """A handshake slot came free: start with the bytes kept meanwhile."""
        if self.transport is None or self.queued is None:
            return
        data, self.queued = self.queued, None
        self.transport.resume_reading()
        self.data_received(data)

    def _flush(self) -> None:
        if self.bio_out is not None and self.transport is not None and self.bio_out.pending:
            self.transport.write(self.bio_out.read())

    def _read_tls(self) -> None:
        while self.tls is not None and self.transport is not None:
            if self.transport.is_closing():
                break  # refused or done: what the client still sends is not read
            try:
                chunk = self.tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                if self.tunnel_source:
                    self.close()
                else:
                    self.eof_received()
                break
            except (ssl.SSLError, OSError) as e:
                self.abort(f"TLS error: {e}")
                break
            if not chunk:
                self.eof_received()
                break
            if self.tunnel_source:
                self._to_backend(chunk)
            else:
                self._http_data(chunk)
        self._flush()

    def _send(self, data: bytes | None) -> None:
        if not data or self.transport is None:
            return
        if self.tls is not None:
            self.tls.write(data)
            self._flush()
        elif self.server.tls is None:
            self.transport.write(data)

    # ------------------------------------------------------------ HTTP

    def _http_data(self, data: bytes) -> None:
        if self.lingering:
            return  # draining what a refused request still sends
        if self.http is None:
            # made with the first request, not at the handshake: an idle connection
            # holds only OpenSSL's state
            self.http = h11.Connection(
                h11.SERVER, max_incomplete_event_size=self.server.settings.max_request_bytes
            )
        self.received += len(data)
        if self.received > self.request_limit:
            self.abort("request too large")
            return
        self.http.receive_data(data)
        if self.task is None:
            self._process()

    def _process(self) -> None:
        """Take the next events from h11 until one needs an answer or more data."""
        s = self.server.settings
        while self.http is not None and self.task is None and not self.lingering:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as e:
                self._refuse(400, f"bad request: {e}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._cancel_timer()
                request = self._request(event)
                upload = self._upload_of(request)
                problem = self._check_head(event, upload)
                if problem is not None:
                    self._refuse(400, f"bad request: {problem}")
                    return
                route = self.server.upgrades.get(request.path)
                if route is not None and "upgrade" in request.headers and request.method == "GET":
                    self._upgrade(route, event)
                    return
                self.pending = request
                if upload is not None:
                    if not self._begin_upload(upload, self.pending, event):
                        return
                elif self.pending.content_length > s.max_body_bytes:
                    self._refuse(413, "request body too large")
                    return
            elif isinstance(event, h11.Data) and self.sink is not None:
                refused = self.sink.feed(event.data)
                if refused is not None:
                    self._drop_sink()
                    self._refuse(refused.status, "upload refused", refused)
                    return
            elif isinstance(event, h11.EndOfMessage):
                request, self.pending = self.pending, None
                sink, self.sink = self.sink, None
                if request is not None:
                    self._cancel_timer()
                    self.task = asyncio.get_running_loop().create_task(self._respond(request, sink))
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return
            # h11.Data: a body nobody reads (its size is bounded above)

    def _upload_of(self, request: Request) -> Upload | None:
        return self.server.uploads.get(request.path) if request.method == "POST" else None

    def _begin_upload(self, upload: Upload, request: Request, event: h11.Request) -> bool:
        """Start streaming the body to the upload's sink; False: refused (answered)."""
        if not any(name == b"content-length" for name, _ in event.headers):
            self._refuse(411, "upload without Content-Length",
                         upload.refusal(411, "Content-Length required"))  # fmt: skip
            return False
        if request.content_length > upload.max_body:
            why = f"larger than {upload.max_body} bytes"
            self._refuse(413, "upload too large", upload.refusal(413, why))
            return False
        started = upload.begin(request)
        if isinstance(started, Response):
            self._refuse(started.status, "upload refused", started)
            return False
        self.sink = started
        self.request_limit = self.server.settings.max_request_bytes + request.content_length
        # a page's timers do not fit an upload of megabytes: a pace does
        if self.life_timer is not None:
            self.life_timer.cancel()
            self.life_timer = None
        seconds = self.server.settings.upload_grace + request.content_length / UPLOAD_MIN_RATE
        too_slow = upload.refusal(408, "upload too slow")
        self.timer = asyncio.get_running_loop().call_later(seconds, self._too_slow, too_slow)
        return True

    def _too_slow(self, response: Response) -> None:
        self.timer = None
        self._drop_sink()
        self._refuse(408, "upload too slow", response)

    def _drop_sink(self) -> None:
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink.discard()

    def _check_head(self, event: h11.Request, upload: Upload | None) -> str | None:
        s = self.server.settings
        if len(event.target) + len(event.method) + 10 > s.max_line_bytes:
            return "request line too long"
        fields = upload.max_header_fields if upload is not None else s.max_header_fields
        if len(event.headers) > fields:
            return "too many header fields"
        for name, value in event.headers:
            if len(name) + len(value) + 2 > s.max_line_bytes:
                return "header field too long"
        return None

    def _request(self, event: h11.Request) -> Request:
        headers: dict[str, str] = {}
        fields = []
        for name, value in event.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
            fields.append((key, text))
        target = event.target.decode("latin-1")
        raw_path, _, query = target.partition("?")
        length = headers.get("content-length", "0")
        return Request(
            method=event.method.decode("ascii"),
            path=urllib.parse.unquote(raw_path, errors="replace"),
            query=query,
            headers=headers,
            remote=self.remote,
            local=self.local,
            content_length=int(length) if length.isdigit() else 0,
            fields=tuple(fields),
        )

    def _head(self, response: Response, close: bool) -> h11.Response:
        headers = {**self.server.common_headers, **response.headers}
        headers.setdefault("Date", _date())
        if response.file is not None:
            headers["Content-Length"] = str(response.file_size)
        elif "Content-Length" not in headers:
            headers["Content-Length"] = str(len(response.body))
        if close:
            headers["Connection"] = "close"
        try:
            reason = http.HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(
            status_code=response.status, headers=list(headers.items()), reason=reason
        )

    def _refuse(self, status: int, why: str, response: Response | None = None) -> None:
        """Answer a request we will not serve, then close (after draining what follows)."""
        self.server.log.debug("%s from %s", why, self.remote)
        self._cancel_timer()
        if response is None:
            text = f"{status}: {http.HTTPStatus(status).phrase}\n".encode()
            response = Response(status, {"Content-Type": "text/plain; charset=utf-8"}, text)
        text = response.body
        head = self._head(response, close=True)
        raw = b"HTTP/1.1 %d %s\r\n" % (status, head.reason) + b"".join(
            b"%s: %s\r\n" % (n, v) for n, v in head.headers.raw_items()
        )
        self._send(raw + b"\r\n" + text)
        self._linger()

    def _linger(self) -> None:
        """Send close_notify and FIN, read and drop what the client still sends for a
        moment, then close: a close with unread data would reset the connection and
        could destroy the answer before the client reads it."""
        self.lingering = True
        self.http = None
        if self.tls is not None:
            with contextlib.suppress(ssl.SSLError, OSError):
                self.tls.unwrap()
            self._flush()
        if self.transport is not None:
            with contextlib.suppress(OSError, RuntimeError):
                if self.transport.can_write_eof():
                    self.transport.write_eof()
            self._set_timer(self.server.settings.linger, None)

    async def _respond(self, request: Request, sink: UploadSink | None = None) -> None:
        conn = self.http
        response: Response | None = None
        close = True
        try:
            try:
                response = await (sink.finish() if sink else self.server.app(request))
            except Exception:
                self.server.log.exception("request %s %s failed", request.method, request.path)
                response = Response(500, {"Content-Type": "text/plain"}, b"500: internal error\n")
            if conn is None or self.transport is None:
                return
            close = (
                self.server.stopping
                or conn.their_state is h11.MUST_CLOSE
                or request.headers.get("connection", "").lower() == "close"
            )
            self._send(conn.send(self._head(response, close)))
            if request.method != "HEAD":
                if response.file is not None:
                    await self._send_file(conn, response.file)
                elif response.body:
                    self._send(conn.send(h11.Data(data=response.body)))
            self._send(conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as e:
            self.abort(f"cannot answer: {e}")
            return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            if response is not None and response.file is not None:
                response.file.close()
            self.task = None
        if self.transport is None:
            return
        if close or conn.our_state is h11.MUST_CLOSE:
            self.close()
            return
        conn.start_next_cycle()
        self.received = 0
        self.request_limit = self.server.settings.max_request_bytes
        self._wait_for_request()
        self._process()

    async def _send_file(self, conn: h11.Connection, f: BinaryIO) -> None:
        # local reads are short; a slow client waits only on its own flow control
        while chunk := f.read(WRITE_CHUNK):
            if self.writable is not None:
                await self.writable.wait()
            if self.transport is None:
                raise ConnectionResetError
            self._send(conn.send(h11.Data(data=chunk)))

    # ------------------------------------------------------------ ending

    def _wait_for_request(self) -> None:
        self._set_timer(self.server.settings.request_timeout, "no complete request header in time")

    def _set_timer(self, seconds: float, why: str | None) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        if why is None:
            self.timer = loop.call_later(seconds, self._end_linger)
        else:
            self.timer = loop.call_later(seconds, self.abort, why)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _end_linger(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """Orderly close: TLS close_notify, then the connection."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.tls is not None and not self.handshaking:
            with contextlib.suppress(ssl.SSLError, OSError):
                self.tls.unwrap()
            self._flush()
        self.transport.close()

    def abort(self, why: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.server.log.debug("closing connection from %s: %s", self.remote, why)
            self.transport.abort()
