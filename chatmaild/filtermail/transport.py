"""Remote delivery (the ``transport`` role): HTTPS ``/mxdeliv`` first, then SMTP.

Postfix hands every message for another domain to this role over LMTP
(``default_transport = mxdeliv:unix:<filtermail_transport_socket>``); its
queue keeps what is deferred, retries it and bounces what fails for good.
For each destination domain of a message:

1. its MX hosts (RFC 5321 5.1, null MX RFC 7505), or the route ``make run``
   gives a peer relay;
2. unless ``mxdeliv_send = no``: ``POST https://<mx host>/mxdeliv``, the
   certificate checked against the MX name (the port-25 TLS policy of the
   domain: ``delivery.tls_policy``).  A host that answers without the route
   is remembered for 30 minutes and asked over SMTP only;
3. SMTP to port 25 of the MX hosts, STARTTLS required (same policy).

Neither way sends what the other would not: both carry the queued message
as filtermail outgoing signed it.  Each recipient's LMTP reply says what
happened (``250 ... delivered over HTTPS to``, the peer's refusal, or a 4xx
that keeps the message in the queue); one log line per domain and message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import os
import smtplib
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

from chatmaild.common import metrics
from chatmaild.common.config import Config
from chatmaild.common.httppost import HTTPError, PostClient
from chatmaild.filtermail.common import domain_of
from chatmaild.filtermail.delivery import (
    NO_HTTPS_TTL,
    Kind,
    MXResult,
    Outcome,
    TLSPolicy,
    clean_text,
    literal_host,
    mx_hosts,
    mxdeliv_outcome,
    reply_class,
    smtp_reply,
    tls_policy,
)
from chatmaild.filtermail.dkim import make_resolver
from chatmaild.filtermail.smtp import Envelope, Session, dot_stuff

log = logging.getLogger("filtermail-transport")

MXDELIV_BATCH = 100  # recipients per POST: what our /mxdeliv takes at most
# POSTs in flight to one host: what our /mxdeliv takes from one source at once (more
# get 429 and wait in the queue for Postfix's next retry)
HTTPS_PER_HOST = 8
HTTPS_CLIENTS = 512  # hosts with a kept-alive client at once
SMTP_THREADS = 32  # SMTP sessions at once (smtplib blocks: one thread each)


@dataclass(frozen=True)
class Host:
    name: str  # the MX name: the TLS server name, the URL's host
    connect: str  # where to connect: the name itself, or a local route's address
    https_port: int = 443
    smtp_port: int = 25


class Routes:
    """``make run``'s peers (``--routes FILE``): lines ``domain address smtp_port
    https_port``, re-read when the file changes.  With routes, every other
    domain is refused: a local relay delivers nowhere else."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._routes: dict[str, Host] = {}

    def lookup(self, domain: str) -> Host | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp, self._routes = stamp, self._read() if stamp else {}
        return self._routes.get(domain)

    def _read(self) -> dict[str, Host]:
        routes = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == 4 and not line.startswith("#"):
                domain, address, smtp_port, https_port = parts
                domain = domain.lower()
                # an IP-only relay's name (TLS, URL) is its bare address
                name = literal_host(domain) or domain
                routes[domain] = Host(name, address, int(https_port), int(smtp_port))
        return routes


@functools.cache
def tls_context(policy: TLSPolicy) -> ssl.SSLContext:
    """One context per policy, shared by every connection (loading the system's CA
    certificates for each delivery would cost milliseconds and memory)."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if policy is not TLSPolicy.VERIFY:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def is_public(address: str) -> bool:
    """Whether ``address`` is on the Internet: not loopback, private, link-local,
    shared (CGNAT), reserved, multicast or unspecified."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return ip.is_global and not ip.is_multicast


class Unreachable(Exception):
    """This host took no part of the message over this way: try the next one."""


def smtp_session(
    host: Host,
    ctx: ssl.SSLContext | None,
    helo: str,
    sender: str,
    rcpts: Sequence[str],
    content: bytes,
    timeout: float,
) -> list[str]:
    """One SMTP transaction with ``host`` (blocking: runs in a thread); a reply per
    recipient.  ``ctx`` None: TLS only if offered.  Raises Unreachable."""
    need_utf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
    try:
        with smtplib.SMTP(local_hostname=helo, timeout=timeout) as s:
            # the TLS server name (SNI, the certificate check) is the MX name, whatever
            # address is connected to; smtplib takes it from _host (3.11 to 3.13)
            s._host = host.name
            code, msg = s.connect(host.connect, host.smtp_port)
            if code != 220:
                raise Unreachable(f"greeting {code} {clean_text(msg)}")
            s.ehlo()
            if s.has_extn("starttls"):
                s.starttls(context=ctx or tls_context(TLSPolicy.MAY))
                s.ehlo()
            elif ctx is not None:
                raise Unreachable("offers no STARTTLS")
            options = []
            if need_utf8:
                if not s.has_extn("smtputf8"):
                    refusal = f"553 5.6.7 {host.name} does not take internationalized addresses"
                    return [refusal] * len(rcpts)
                options.append("SMTPUTF8")
                s.command_encoding = "utf-8"
            if s.has_extn("8bitmime") and not content.isascii():
                options.append("BODY=8BITMIME")
            if s.has_extn("size"):
                options.append(f"SIZE={len(content)}")
            # docmd, not mail()/rcpt(): smtplib would re-parse the addresses
            code, msg = s.docmd("MAIL", f"FROM:<{sender}>{''.join(' ' + o for o in options)}")
            if code != 250:
                if 400 <= code < 500:
                    raise Unreachable(f"MAIL FROM answered {code} {clean_text(msg)}")
                return [smtp_reply(host.name, code, msg)] * len(rcpts)
            replies: list[str | None] = [None] * len(rcpts)
            for i, rcpt in enumerate(rcpts):
                code, msg = s.docmd("RCPT", f"TO:<{rcpt}>")
                if code not in (250, 251):
                    replies[i] = smtp_reply(host.name, code, msg)
            if all(r is not None for r in replies):
                s.rset()
                return [r for r in replies if r is not None]
            try:
                code, msg = s.data(content)
            except smtplib.SMTPDataError as e:
                code, msg = e.smtp_code, e.smtp_error
            final = smtp_reply(host.name, code, msg)
            return [r if r is not None else final for r in replies]
    except Unreachable:
        raise
    except smtplib.SMTPServerDisconnected as e:
        raise Unreachable(f"disconnected: {e}") from None
    except smtplib.SMTPResponseException as e:
        raise Unreachable(f"{e.smtp_code} {clean_text(e.smtp_error)}") from None
    except (OSError, smtplib.SMTPException, UnicodeError, ValueError) as e:
        raise Unreachable(clean_text(str(e) or type(e).__name__)) from None


class TransportHandler:
    """The LMTP handler: every recipient's reply after DATA."""

    direction = "transport"

    def __init__(self, config: Config, routes: Routes | None = None) -> None:
        self.config = config
        self.routes = routes
        self.send_https = config.mxdeliv_send
        self.helo = config.mail_domain.strip("[]")
        self.timeout = config.mxdeliv_timeout
        self.resolver: dns.asyncresolver.Resolver = make_resolver(config.dns_resolver, 20.0)
        self._no_https: dict[str, float] = {}  # host -> until when it is asked over SMTP only
        self._clients: dict[tuple[str, str, int, TLSPolicy], PostClient] = {}
        self._threads = concurrent.futures.ThreadPoolExecutor(
            SMTP_THREADS, thread_name_prefix="smtp"
        )

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- SMTP hooks
    async def handle_mail(self, session: Session, env: Envelope, address: str) -> str | None:
        return None

    async def handle_rcpt(self, session: Session, env: Envelope, address: str) -> str | None:
        domain = domain_of(address).lower()
        if not domain or domain == self.config.mail_domain.lower():
            return f"550 5.1.1 <{address}> is not for another domain"
        return None

    async def handle_data(self, session: Session, env: Envelope, content: bytearray) -> list[str]:
        by_domain: dict[str, list[int]] = {}
        for i, rcpt in enumerate(env.rcpt_tos):
            by_domain.setdefault(domain_of(rcpt).lower(), []).append(i)
        message = bytes(content)
        sender = env.mail_from or ""
        results = await asyncio.gather(
            *(
                self.deliver(domain, sender, [env.rcpt_tos[i] for i in idx], message)
                for domain, idx in by_domain.items()
            )
        )
        replies = [""] * len(env.rcpt_tos)
        for idx, domain_replies in zip(by_domain.values(), results, strict=True):
            for i, reply in zip(idx, domain_replies, strict=True):
                replies[i] = reply
        return replies

    # -- one destination domain
    async def deliver(
        self, domain: str, sender: str, rcpts: list[str], message: bytes
    ) -> list[str]:
        started = time.monotonic()
        way, replies = await self._deliver(domain, sender, rcpts, message)
        for word in dict.fromkeys(reply_class(r) for r in replies):
            shown = next(r for r in replies if reply_class(r) == word)
            count = sum(reply_class(r) == word for r in replies)
            metrics.REMOTE_DELIVERIES.labels(word, way.split(" ", 1)[0]).inc(count)
            log.info(
                "%s to %s, %d recipient(s), %d bytes, via %s in %.0f ms: %s",
                word, domain, count, len(message), way,
                (time.monotonic() - started) * 1000, shown,
            )  # fmt: skip
        return replies

    async def _deliver(
        self, domain: str, sender: str, rcpts: list[str], message: bytes
    ) -> tuple[str, list[str]]:
        n = len(rcpts)
        hosts, error = await self._hosts(domain)
        if error:
            return "dns", [error] * n
        # make run's peers have self-signed certificates, as their port 25 has
        policy = TLSPolicy.ENCRYPT if self.routes is not None else tls_policy(domain)
        problems: list[str] = []
        if self.routes is None:
            hosts = await self._public(hosts, problems)
        https_failed: list[str] = []
        if self.send_https:
            body = bytes(dot_stuff(message))
            for host in hosts:
                if self._no_https.get(host.name, 0.0) > time.monotonic():
                    continue
                first, replies = await self._post(host, policy, sender, rcpts, body)
                if first is None or first.kind in (Kind.FAILED, Kind.NO_ROUTE):
                    problems.append(first.reply.split(" ", 2)[2] if first else
                                    f"{host.name}: HTTPS unreachable")  # fmt: skip
                    https_failed.append(host.name)
                    if first is not None and first.kind is Kind.NO_ROUTE:
                        self._no_https[host.name] = time.monotonic() + NO_HTTPS_TTL
                    continue
                return f"https {host.name}", replies
        ctx = None if policy is TLSPolicy.MAY else tls_context(policy)
        loop = asyncio.get_running_loop()
        for host in hosts:
            try:
                replies = await loop.run_in_executor(
                    self._threads, smtp_session, host, ctx, self.helo, sender, rcpts,
                    message, self.timeout,
                )  # fmt: skip
            except Unreachable as e:
                problems.append(f"{host.name}: SMTP {e}")
                self._no_https.pop(host.name, None)  # its HTTPS may come first again
                continue
            for name in https_failed:  # as the reference does: SMTP only, for a while
                self._no_https[name] = time.monotonic() + NO_HTTPS_TTL
            return f"smtp {host.name}", replies
        text = "; ".join(problems) or "no host"
        return "-", [f"451 4.4.1 no mail server of {domain} took the message: {text}"[:900]] * n

    async def _hosts(self, domain: str) -> tuple[list[Host], str | None]:
        if self.routes is not None:
            route = self.routes.lookup(domain)
            if route is None:
                return [], "550 5.7.1 delivery outside this local relay is disabled"
            return [route], None
        address = literal_host(domain)
        if address is not None:
            return [Host(address, address)], None
        if domain.startswith("["):
            return [], f"501 5.1.3 bad address literal {domain}"
        result = await self._mx(domain)
        if result.error:
            return [], result.error
        return [Host(name, name) for name in result.hosts], None

    async def _public(self, hosts: list[Host], problems: list[str]) -> list[Host]:
        """``hosts`` with the public address each is to be reached at.  A name that
        resolves to loopback, a private network or the like is skipped: DNS of
        another domain must not point this relay at the machine's own services."""
        loop = asyncio.get_running_loop()
        found = []
        for host in hosts:
            try:
                infos = await loop.getaddrinfo(host.connect, None, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as e:
                problems.append(f"{host.name}: {clean_text(str(e))}")
                continue
            addresses = [info[4][0] for info in infos]
            public = [a for a in addresses if is_public(a)]
            if not public:
                problems.append(f"{host.name}: not a public address ({', '.join(addresses)})")
                continue
            found.append(replace(host, connect=public[0]))
        return found

    async def _mx(self, domain: str) -> MXResult:
        try:
            answer = await self.resolver.resolve(domain + ".", "MX")
            records = [(r.preference, r.exchange.to_text()) for r in answer]
            return mx_hosts(domain, records, nxdomain=False)
        except dns.resolver.NXDOMAIN:
            return mx_hosts(domain, None, nxdomain=True)
        except dns.resolver.NoAnswer:
            return mx_hosts(domain, None, nxdomain=False)
        except dns.exception.DNSException as e:
            return MXResult(error=f"451 4.4.3 DNS lookup of {domain} failed: {clean_text(str(e))}")

    async def _post(
        self, host: Host, policy: TLSPolicy, sender: str, rcpts: list[str], body: bytes
    ) -> tuple[Outcome | None, list[str]]:
        """POST the message to ``host`` in batches of recipients: the first batch's
        outcome (None: no answer) and a reply per recipient."""
        client = self._client(host, policy)
        first: Outcome | None = None
        replies: list[str] = []
        for start in range(0, len(rcpts), MXDELIV_BATCH):
            batch = rcpts[start : start + MXDELIV_BATCH]
            fields = (("X-MAIL-FROM", sender),) if sender else ()
            fields += tuple(("X-MAIL-TO", r) for r in batch)
            try:
                answer = await client.exchange(body, fields)
            except (OSError, TimeoutError, HTTPError, ValueError) as e:
                log.debug("%s: HTTPS failed: %s", host.name, e)
                if first is None:
                    return None, []
                # earlier batches are delivered: only this one waits in the queue
                outcome = Outcome(Kind.TEMPORARY, f"451 4.4.2 {host.name}: HTTPS failed")
            else:
                marker = answer.headers.get("x-mxdeliv", "")
                outcome = mxdeliv_outcome(host.name, answer.status, marker, answer.body)
            if first is None:
                first = outcome
                if outcome.kind in (Kind.FAILED, Kind.NO_ROUTE):
                    return first, []
            elif outcome.kind in (Kind.FAILED, Kind.NO_ROUTE):
                outcome = Outcome(Kind.TEMPORARY, outcome.reply)
            replies += [outcome.reply] * len(batch)
        return first, replies

    def _client(self, host: Host, policy: TLSPolicy) -> PostClient:
        key = (host.name, host.connect, host.https_port, policy)
        client = self._clients.get(key)
        if client is None:
            if len(self._clients) >= HTTPS_CLIENTS:
                for old_key, old in list(self._clients.items()):
                    if old.in_flight == 0:
                        del self._clients[old_key]
                        asyncio.get_running_loop().create_task(old.close())
            name = f"[{host.name}]" if ":" in host.name else host.name
            client = PostClient(
                f"https://{name}:{host.https_port}/mxdeliv", HTTPS_PER_HOST, self.timeout,
                tls=tls_context(policy), connect_to=host.connect,
            )  # fmt: skip
            self._clients[key] = client
        return client
