"""chatmail-iroh: this relay's own iroh relay for Delta Chat's realtime apps.

Plain HTTP/1.1 on a loopback port (``iroh_relay_port``); the HTTPS front door
passes ``/relay`` on, prefixed with a PROXY v1 line naming the client.  It serves

- ``GET /relay`` with ``Upgrade: iroh derp http``: 101, then iroh 0.35's relay
  frames (``chatmaild.iroh.frames``);
- ``GET /ping``: 200, ``GET /generate_204``: 204 (the apps' probes);
- anything else: 404, or 400 for an upgrade it does not speak.

Limits: connections in all and per source (IPv4 address or IPv6 /64), the HTTP
head and ClientInfo within ``HANDSHAKE_TIMEOUT``, frames of at most a packet of
64 KiB, ``iroh_relay_max_bps`` per client (reading pauses when a client sends
faster), a bounded send queue per client (packets beyond it are dropped), a
Ping every 15 s and the end of a client silent for ``IDLE_TIMEOUT``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import time
from collections.abc import Callable

import h11

from chatmaild.common.config import Config
from chatmaild.common.service import Daemon, Endpoint, run_daemon
from chatmaild.iroh import frames
from chatmaild.iroh.frames import FrameError, FrameType
from chatmaild.iroh.hub import Hub
from chatmaild.iroh.probe import probe_204_headers
from chatmaild.web.limits import RefusalLog, SourceBudget, source_of

HANDSHAKE_TIMEOUT = 10.0  # HTTP head and ClientInfo (iroh's server waits 10 s too)
IDLE_TIMEOUT = 60.0  # nothing from the client, not even a Pong
PING_EVERY = 15.0  # plus up to 5 s of jitter, as iroh's server
MAX_HEAD = 8 * 1024
MAX_QUEUE = 512 * 1024  # bytes waiting for a slow client before its packets drop
STATS_EVERY = 60.0


def answer(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    reason = {101: "Switching Protocols", 200: "OK", 204: "No Content", 400: "Bad Request",
              404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
              503: "Service Unavailable"}[status]  # fmt: skip
    fields = {**(headers or {})}
    if status not in (101, 204):
        fields.setdefault("Content-Type", "text/plain; charset=utf-8")
        fields["Content-Length"] = str(len(body))
        fields["Connection"] = "close"
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n" + body


def probe_answer(method: str, path: str, headers: dict[str, str]) -> bytes:
    """The answer to a request that is not an upgrade."""
    if method not in ("GET", "HEAD"):
        return answer(405, body=b"405: only GET\n")
    if path == "/generate_204":
        return answer(204, probe_204_headers(headers))
    if path == "/ping":
        return answer(200, {"Access-Control-Allow-Origin": "*"})
    if path == "/":
        return answer(200, body=b"iroh relay (chatmaild)\n")
    return answer(404, body=b"404: not found\n")


def parse_proxy_line(line: bytes) -> str | None:
    """The client address of a PROXY v1 line (what the front door sends first)."""
    parts = line.decode("ascii", "replace").split()
    if len(parts) == 6 and parts[0] == "PROXY" and parts[1] in ("TCP4", "TCP6"):
        return parts[2]
    return None


class RelayConnection(asyncio.Protocol):
    """One client: its HTTP request, then, upgraded, its frames."""

    def __init__(self, relay: IrohRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.source = ""
        self.head = bytearray()
        self.http: h11.Connection | None = None
        self.reader: frames.FrameReader | None = None
        self.key = b""
        self.registered = False
        self.timer: asyncio.TimerHandle | None = None
        self.ping_timer: asyncio.TimerHandle | None = None
        self.last_heard = 0.0
        self.allowance = 0.0  # bytes it may still send now (token bucket)
        self.refilled = 0.0
        self.paused = False

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) else "local"
        # counted once the first bytes say who it is: the front door's connections
        # begin with a PROXY line naming the client
        self.relay.connections.add(self)
        self.timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, self.abort, "no relay handshake in time"
        )

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.timer, self.ping_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.ping_timer = None
        if self.registered:
            self.registered = False
            self.relay.hub.unregister(self)
        if self.source:
            self.relay.budget.give(self.source)
            self.source = ""
        self.relay.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.last_heard = time.monotonic()
        try:
            if self.reader is not None:
                self._frames(data)
            else:
                self._http(data)
        except FrameError as e:
            self.abort(f"protocol error: {e}")

    def pause_writing(self) -> None:
        pass  # deliver() looks at the buffer's size

    def resume_writing(self) -> None:
        pass

    # ------------------------------------------------------------ HTTP

    def _admit(self, remote: str) -> bool:
        source = source_of(remote)
        refused = self.relay.budget.take(source)
        if refused is not None:
            self.relay.refusals.note(refused, source)
            assert self.transport is not None
            self.transport.abort()
            return False
        self.source = source
        return True

    def _http(self, data: bytes) -> None:
        if self.http is None:
            self.head += data
            if len(self.head) > MAX_HEAD:
                return self._reply_and_close(answer(400, body=b"400: head too long\n"))
            if self.head.startswith(b"PROXY "):
                line, crlf, rest = bytes(self.head).partition(b"\r\n")
                if not crlf:
                    return  # the PROXY line is not complete yet
                client = parse_proxy_line(line)
                if client is None:
                    return self.abort("bad PROXY line")
                if not self._admit(client):
                    return
                self.remote = client
                data = rest
            elif b"PROXY ".startswith(bytes(self.head)):
                return  # may still be a PROXY line
            else:
                if not self._admit(self.remote):
                    return
                data = bytes(self.head)
            self.head = bytearray()
            self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.http.receive_data(data)
        try:
            event = self.http.next_event()
        except h11.RemoteProtocolError as e:
            return self._reply_and_close(answer(400, body=f"400: {e}\n".encode()))
        if event is h11.NEED_DATA:
            return
        if not isinstance(event, h11.Request):
            return self._reply_and_close(answer(400, body=b"400: bad request\n"))
        headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in event.headers}
        path = event.target.decode("latin-1").partition("?")[0]
        method = event.method.decode("ascii", "replace")
        upgrade = headers.get("upgrade")
        if upgrade is None:
            return self._reply_and_close(probe_answer(method, path, headers))
        if method != "GET" or path not in ("/relay", "/derp") or upgrade != frames.UPGRADE:
            return self._reply_and_close(answer(400, body=b"400: unsupported upgrade\n"))
        # upgraded: what followed the head is the first frames
        trailing = self.http.trailing_data[0]
        self.http = None
        assert self.transport is not None
        self.transport.write(answer(101, {"Upgrade": frames.UPGRADE}))
        self.reader = frames.FrameReader(frames.MAX_CLIENT_FRAME)
        self.allowance = float(self.relay.max_bps)
        self.refilled = time.monotonic()
        if trailing:
            self._frames(trailing)

    def _reply_and_close(self, raw: bytes) -> None:
        if self.transport is not None:
            self.transport.write(raw)
            self.transport.close()

    # ------------------------------------------------------------ relay frames

    def _frames(self, data: bytes) -> None:
        assert self.reader is not None
        self.reader.push(data)
        self._process()

    def _process(self) -> None:
        """Handle the frames buffered so far, as fast as the client's rate allows:
        past it, reading pauses and the rest waits until the rate allows again."""
        assert self.reader is not None
        while self.transport is not None and not self.transport.is_closing():
            if self._over_rate():
                return
            frame = self.reader.next_frame()
            if frame is None:
                return
            kind, content = frame
            self.allowance -= frames.HEADER.size + len(content)
            if not self.registered:
                self._hello(kind, content)
            elif kind == FrameType.SEND_PACKET:
                dst, packet = frames.send_packet(content)
                self.relay.hub.forward(self.key, dst, packet)
            elif kind == FrameType.PING:
                if len(content) != 8:
                    raise FrameError("Ping without 8 bytes")
                self.deliver(frames.encode(FrameType.PONG, content))
            elif kind == FrameType.HEALTH:
                raise FrameError("client reports a problem")
            # Pong, KeepAlive, NotePreferred and types of later versions: nothing to do

    def _hello(self, kind: int, content: bytes) -> None:
        if kind != FrameType.CLIENT_INFO:
            raise FrameError(f"first frame of type {kind}, not ClientInfo")
        key, version = frames.client_info(content)
        if version != frames.PROTOCOL_VERSION:
            self.deliver(frames.encode(FrameType.HEALTH, b"unsupported protocol version"))
            raise FrameError(f"protocol version {version}")
        self.key = key
        self.registered = True
        self.relay.hub.register(self)
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(IDLE_TIMEOUT, self._check_idle)
        self.ping_timer = loop.call_later(PING_EVERY + random.uniform(1, 5), self._ping)
        self.relay.log.debug("node %s connected from %s", key[:8].hex(), self.remote)

    def _over_rate(self) -> bool:
        """Token bucket of max_bps bytes (a second's worth at most); when it is
        empty, pause reading until it has refilled."""
        if self.paused:
            return True
        now = time.monotonic()
        rate = self.relay.max_bps
        self.allowance = min(rate, self.allowance + (now - self.refilled) * rate)
        self.refilled = now
        if self.allowance >= 0:
            return False
        assert self.transport is not None
        self.paused = True
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(-self.allowance / rate, self._unpause)
        return True

    def _unpause(self) -> None:
        self.paused = False
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self._process()
        except FrameError as e:
            self.abort(f"protocol error: {e}")
            return
        if not self.paused:
            self.transport.resume_reading()

    def _ping(self) -> None:
        self.ping_timer = None
        if self.transport is None:
            return
        self.deliver(frames.encode(FrameType.PING, os.urandom(8)))
        self.ping_timer = asyncio.get_running_loop().call_later(
            PING_EVERY + random.uniform(1, 5), self._ping
        )

    def _check_idle(self) -> None:
        silent = time.monotonic() - self.last_heard
        if silent >= IDLE_TIMEOUT:
            self.abort("silent too long")
            return
        self.timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT - silent, self._check_idle)

    # ------------------------------------------------------------ hub.Node

    def deliver(self, frame: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() > MAX_QUEUE:
            return False
        t.write(frame)
        return True

    def replaced(self) -> None:
        self.registered = False  # the newer connection holds the key now
        self.abort("the node connected again")

    def abort(self, why: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.relay.log.debug("closing connection from %s: %s", self.remote, why)
            self.transport.abort()


class IrohRelay(Daemon):
    name = "chatmail-iroh"

    def __init__(self, config: Config, args: argparse.Namespace | None = None) -> None:
        super().__init__(config, args)
        self.hub = Hub()
        self.budget = SourceBudget(
            config.iroh_relay_max_clients,
            config.iroh_relay_max_clients_per_ip,
            "iroh relay connection limit reached",
            "too many iroh relay connections",
        )
        self.refusals = RefusalLog(self.log)
        self.max_bps = config.iroh_relay_max_bps
        self.stats_every = getattr(args, "stats_interval", STATS_EVERY) or STATS_EVERY
        self.connections: set[RelayConnection] = set()
        self._stats_task: asyncio.Task | None = None
        self._last_line = ""

    def endpoint(self) -> Endpoint:
        return Endpoint.tcp("127.0.0.1", self.config.iroh_relay_port)

    async def start(self) -> None:
        if self.config.iroh_relay_port == 0:
            self.log.warning("iroh_relay_port is 0: no iroh relay of our own is wanted")
        self._stats_task = asyncio.get_running_loop().create_task(self._stats())

    def protocol_factory(self) -> Callable[[], asyncio.Protocol]:
        return lambda: RelayConnection(self)

    async def _stats(self) -> None:
        while True:
            await asyncio.sleep(self.stats_every)
            self.refusals.tick()
            self.log_stats()

    def log_stats(self) -> None:
        """One line when the counts changed: its wording is stable, for counting."""
        line = self.hub.counters.line(len(self.hub.nodes))
        if line != self._last_line:
            self._last_line = line
            self.log.info("%s", line)

    async def stop(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        for conn in list(self.connections):
            conn.abort("stopping")
        self.refusals.flush()
        self.log_stats()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=STATS_EVERY,
        metavar="SECONDS",
        help="how often the forwarding counts are logged when they changed (default: %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    return run_daemon(IrohRelay, __doc__, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
