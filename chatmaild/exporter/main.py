"""chatmail-metrics: the relay's metrics for Prometheus, on ``metrics_address``.

``GET /metrics`` answers in Prometheus's text format: the counters and
histograms every chatmaild process keeps in ``metrics_dir`` (mail accepted and
refused per direction and reply code, filter latency, DKIM results, remote
deliveries, accounts created and refused, logins, push tokens and pushes,
expiry), added up, and figures read at the scrape: Postfix's queue (from its
showq service, as postqueue asks it: the unit's postdrop group opens public/),
the certificate's expiry and the account count.  Plain HTTP: put it on loopback
or a monitoring network.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from chatmaild.common.config import Config
from chatmaild.common.service import Daemon, Endpoint, run_daemon
from chatmaild.exporter import collect
from chatmaild.web.limits import Admission
from chatmaild.web.server import HttpsServer, Request, Response, Settings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# the account count and the certificate are read at most this often
SLOW_EVERY = 60.0
POSTFIX_QUEUE = "/var/spool/postfix"
SHOWQ_MAX = 64 * 2**20  # a queue of some 100,000 messages; more is not read


def endpoint_of(address: str) -> Endpoint:
    host, _, port = address.rpartition(":")
    return Endpoint.tcp(host.strip("[]"), int(port))


class MetricsDaemon(Daemon):
    name = "chatmail-metrics"
    fast_loop = False

    def __init__(self, config: Config, args: argparse.Namespace | None = None) -> None:
        super().__init__(config, args)
        self.postfix_queue = getattr(args, "postfix_queue", None) or POSTFIX_QUEUE
        self.read_every = getattr(args, "read_every", SLOW_EVERY)
        self.server: HttpsServer | None = None
        self._slow: tuple[float, str] = (0.0, "")

    def endpoint(self) -> Endpoint:
        return endpoint_of(self.config.metrics_address or "127.0.0.1:9390")

    async def start(self) -> None:
        if not self.config.metrics_address:
            self.log.warning("metrics_address is empty: the daemons count nothing")
        Path(self.config.metrics_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        admission = Admission(max_connections=64, max_per_source=16)
        self.server = HttpsServer(self.handle, None, logging.getLogger(self.name), Settings(),
                                  admission)  # fmt: skip

    def protocol_factory(self) -> Callable[[], asyncio.Protocol]:
        assert self.server is not None
        return self.server.protocol

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown(5.0)

    async def handle(self, request: Request) -> Response:
        if request.path != "/metrics":
            return Response(404, {"Content-Type": "text/plain"}, b"404: /metrics only\n")
        if request.method not in ("GET", "HEAD"):
            return Response(405, {"Allow": "GET, HEAD"}, b"")
        text = await asyncio.to_thread(collect.counters_text, self.config.metrics_dir)
        text += await self.queue()
        text += await asyncio.to_thread(self.slow)
        return Response(200, {"Content-Type": CONTENT_TYPE}, text.encode())

    async def queue(self) -> str:
        """Postfix's queue from its showq service (what postqueue asks; the unit's
        postdrop group opens public/)."""
        path = str(Path(self.postfix_queue) / "public/showq")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 10)
            try:
                data = await asyncio.wait_for(reader.read(SHOWQ_MAX), 30)
                while chunk := await asyncio.wait_for(reader.read(SHOWQ_MAX), 30):
                    data += chunk
                    if len(data) > SHOWQ_MAX:
                        raise ValueError(f"more than {SHOWQ_MAX} bytes")
            finally:
                writer.close()
            entries = collect.parse_showq(data)
        except (OSError, TimeoutError, ValueError) as e:
            self.log.warning("Postfix's queue (%s): %s", path, e)
            return ""
        return collect.queue_text(entries)

    def slow(self) -> str:
        """The certificate and the account count: read once a minute at most (a
        scrape every few seconds must not walk a large mail store each time)."""
        when, text = self._slow
        if time.monotonic() - when < self.read_every and text:
            return text
        c = self.config
        from chatmaild.acme.certificate import parse_pem
        from chatmaild.admin.status import DEFAULT_CERT

        path = c.tls_external_cert_and_key[0] if c.tls_external_cert_and_key else DEFAULT_CERT
        try:
            not_after: float | None = parse_pem(Path(path).read_bytes()).not_after.timestamp()
        except (OSError, ValueError) as e:
            self.log.warning("certificate %s: %s", path, e)
            not_after = None
        try:
            count = sum(1 for e in os.scandir(c.mailboxes_dir) if e.is_dir() and "@" in e.name)
        except OSError:
            count = 0
        text = collect.certificate_text(not_after) + collect.accounts_text(
            count, not Path(c.nocreate_file).exists()
        )
        self._slow = (time.monotonic(), text)
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--read-every",
        type=float,
        default=SLOW_EVERY,
        metavar="SECONDS",
        help="how long the account count and the certificate's expiry are reused between"
        " scrapes (default: %(default)s)",
    )
    parser.add_argument(
        "--postfix-queue",
        default=POSTFIX_QUEUE,
        metavar="DIR",
        help="Postfix's queue_directory, whose showq service lists the queue"
        " (default: %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    return run_daemon(MetricsDaemon, __doc__, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
