"""chatmail-metrics: the relay's metrics for Prometheus, on ``metrics_address``.

A role of filtermail's process while ``metrics_address`` is set (filtermail.service
runs it then; ``chatmail-metrics`` runs it alone).  ``GET /metrics`` answers in
Prometheus's text format: the counters, histograms and gauges every chatmaild
process keeps in ``metrics_dir`` (mail accepted and refused per direction and
reply code, filter latency, DKIM results, remote deliveries, accounts, logins,
push tokens and pushes, expiry), added up, and figures read at the scrape:
Postfix's queue (from its showq service, as postqueue asks it: public/ is group
postdrop's, which filtermail has), the certificate's expiry, whether
registration is open, and Dovecot's own metrics (logins, IMAP commands,
deliveries, hibernation: ``dovecot_*``), asked from its stats service's HTTP
socket (mode 0600, the vmail user; the rendered dovecot.conf defines them).
Plain HTTP: put it on loopback or a monitoring network.

LOG LINES
    Postfix's queue (PATH): WHY
    Dovecot's metrics (PATH): WHY
    certificate PATH: WHY
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from chatmaild.common.config import Config
from chatmaild.common.service import Daemon, Endpoint, run_daemon
from chatmaild.exporter import DOVECOT_STATS, POSTFIX_QUEUE, add_arguments, collect

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CERT_EVERY = 60.0  # the certificate is read at most this often
SHOWQ_TIMEOUT = 30.0
DOVECOT_TIMEOUT = 10.0
MAX_DOVECOT_ANSWER = 4 << 20  # bytes: a few hundred series are some 50 KB
HEAD_TIMEOUT = 10.0
MAX_HEAD = 8192
SCRAPES_AT_ONCE = 4


class MetricsDaemon(Daemon):
    name = "chatmail-metrics"

    stream_limit = MAX_HEAD

    def __init__(self, config: Config, args: argparse.Namespace | None = None) -> None:
        super().__init__(config, args)
        self.postfix_queue = getattr(args, "postfix_queue", None) or POSTFIX_QUEUE
        self.dovecot_stats = getattr(args, "dovecot_stats", None) or DOVECOT_STATS
        self._cert: tuple[float, str] = (0.0, "")
        self._scrapes = asyncio.Semaphore(SCRAPES_AT_ONCE)

    def endpoint(self) -> Endpoint:
        return Endpoint.parse(self.config.metrics_address or "127.0.0.1:9390")

    async def start(self) -> None:
        if not self.config.metrics_address:
            self.log.warning("metrics_address is empty: the daemons count nothing")

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One request per connection, then close: what a Prometheus scrape needs,
        without an HTTP library in filtermail's process (README, "Memory")."""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        status, headers, body = await self.answer(method, path)
        lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}",
                 "Connection: close"]  # fmt: skip
        writer.write("\r\n".join(lines).encode() + b"\r\n\r\n")
        if method != "HEAD":
            writer.write(body)
        try:
            await writer.drain()
        finally:
            writer.close()

    async def answer(self, method: str, path: str) -> tuple[str, list[str], bytes]:
        if path != "/metrics":
            return "404 Not Found", ["Content-Type: text/plain"], b"404: /metrics only\n"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", ["Allow: GET, HEAD"], b""
        with self.request():
            async with self._scrapes:
                text = await asyncio.to_thread(collect.counters_text, self.config.metrics_dir)
                text += await self.queue()
                text += await self.dovecot()
        text += self.certificate()
        text += collect.registration_text(not Path(self.config.nocreate_file).exists())
        return "200 OK", [f"Content-Type: {CONTENT_TYPE}"], text.encode()

    async def queue(self) -> str:
        """Postfix's queue from its showq service, counted piece by piece (a long
        queue costs time between the pieces, not memory)."""
        path = str(Path(self.postfix_queue) / "public/showq")
        tally = collect.ShowqTally()
        try:
            async with asyncio.timeout(SHOWQ_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(path)
                try:
                    while not tally.done and (piece := await reader.read(65536)):
                        tally.feed(piece)
                finally:
                    writer.close()
            if not tally.done:
                raise ValueError("the list did not end")
        except (OSError, TimeoutError, ValueError) as e:
            self.log.warning("Postfix's queue (%s): %s", path, e)
            return ""
        return collect.queue_text(tally)

    async def dovecot(self) -> str:
        """Dovecot's own metrics, from its stats service (OpenMetrics, made
        Prometheus text like the rest of the answer)."""
        try:
            async with asyncio.timeout(DOVECOT_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(self.dovecot_stats)
                try:
                    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"
                                 b"Connection: close\r\n\r\n")  # fmt: skip
                    answer = b""
                    while piece := await reader.read(65536):
                        answer += piece
                        if len(answer) > MAX_DOVECOT_ANSWER:
                            raise ValueError(f"answer over {MAX_DOVECOT_ANSWER} bytes")
                finally:
                    writer.close()
            return collect.dovecot_text(collect.http_body(answer))
        except (OSError, TimeoutError, ValueError) as e:
            self.log.warning("Dovecot's metrics (%s): %s", self.dovecot_stats, e)
            return ""

    def certificate(self) -> str:
        when, text = self._cert
        if time.monotonic() - when < CERT_EVERY and text:
            return text
        from chatmaild.acme.certificate import parse_pem

        path = self.config.tls_cert_and_key[0]
        try:
            not_after: float | None = parse_pem(Path(path).read_bytes()).not_after.timestamp()
        except (OSError, ValueError) as e:
            self.log.warning("certificate %s: %s", path, e)
            not_after = None
        text = collect.certificate_text(not_after)
        self._cert = (time.monotonic(), text)
        return text


def main(argv: list[str] | None = None) -> int:
    return run_daemon(MetricsDaemon, __doc__, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
