"""The relay's web front door over HTTPS: home page with the invite QR code, and /new.

Routes (aiohttp; HEAD works wherever GET does, other methods get 405 with Allow):

    GET  /, /index.html   home page: the invite QR code (DCACCOUNT:https://<host>/new)
                          and a button opening the invite in Delta Chat
    GET  /info.html       what this relay keeps and for how long (numbers from chatmail.ini)
    GET  /privacy.html    the privacy_* contacts (or that they are unset) and what is stored
    GET  /invite.svg      the invite QR code alone
    POST /new             JSON {"email": ..., "password": ..., "dclogin_url": ...}
    GET  /new             301 to dcaccount:https://<host>/new (the app then POSTs itself)
    POST /cgi-bin/newemail.py   like POST /new, for QR codes printed long ago

With ``www_folder`` set, the operator's own static site is served instead of
the three pages: every other GET path is a file below the folder (a
directory's index.html, the folder's 404.html for what is missing).  Hidden
names (except .well-known), ``..`` and symlinks leading out of the folder are
refused.  /new and /invite.svg stay.

POST /new hands out a random address of this relay and a random password; the
localpart has ``username_max_length`` characters from a-z0-9, the password
``password_min_length + 3`` from letters, digits and punctuation (``secrets``
RNG).  Nothing is stored: the account comes into existence on the first
IMAP/SMTP login.  /new is limited per client IP (token bucket: 2 per second,
burst 5); more get 429.

When the request's Host is an IP address (a relay without DNS, like ``make
run``), links name that IP and its port, the ``dclogin:`` link carries the
actual IMAP and submission ports, and the home page's button is such a ready
``dclogin:`` account, because the app could not look the relay up by name.

Limits: request line and each header field 8190 bytes; at most 80 KiB
received per request (header and body; bodies are never read, and one above
64 KiB gets 413); the first request within --request-timeout seconds of the
connection, which is also the idle time allowed between keep-alive requests;
a connection open --connection-timeout seconds at most.

LOG LINES
    issued credentials for ADDR to IP
    rate limited: IP

FILES
    /etc/chatmail/chatmail.ini    configuration (mail_domain, newemail_port,
                                  tls_external_cert_and_key, www_folder, privacy_*,
                                  and the limits the info page shows)
    /etc/chatmail/tls/{cert,key}.pem   certificate when no external one is configured

SIGNALS
    SIGTERM, SIGINT    finish requests in flight, then exit 0
"""

from __future__ import annotations

import argparse
import email.utils
import functools
import ipaddress
import logging
import os
import re
import secrets
import ssl
import string
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .config import Config
from .service import Daemon, Endpoint, run_daemon
from .web import pages, static
from .web.guard import ConnectionGuard, guard_of
from .web.qr import qr_svg_document

DEFAULT_TLS = ("/etc/chatmail/tls/cert.pem", "/etc/chatmail/tls/key.pem")
LOCALPART_ALPHABET = string.ascii_lowercase + string.digits
PASSWORD_ALPHABET = string.ascii_letters + string.digits + string.punctuation
NEW_PATHS = ("/new", "/cgi-bin/newemail.py")
MAX_LINE_BYTES = 8190
MAX_HEADER_FIELDS = 32
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT = 10.0
CONNECTION_TIMEOUT = 300.0
# a body nobody reads is drained this long before the connection closes
LINGER_SECONDS = 2.0
PAGE_MAX_AGE = 600
JSON_TYPE = "application/json"


# ---------------------------------------------------------------- pure logic


def generate_credentials(config: Config) -> tuple[str, str]:
    """A random address of this relay and a random password."""
    local = "".join(secrets.choice(LOCALPART_ALPHABET) for _ in range(config.username_max_length))
    password = "".join(
        secrets.choice(PASSWORD_ALPHABET) for _ in range(config.password_min_length + 3)
    )
    return f"{local}@{config.mail_domain}", password


def dclogin_url(
    addr: str,
    password: str,
    *,
    imap_host: str | None = None,
    imap_port: int | None = None,
    smtp_host: str | None = None,
    smtp_port: int | None = None,
    accept_invalid_certs: bool = True,
) -> str:
    """``dclogin:`` link; the password is fully percent-encoded, ``@[]`` of the address are not.

    Ports given mean implicit TLS on them (``is=ssl`` / ``ss=ssl``).
    """
    query = [("p", password), ("v", "1")]
    if imap_host:
        query.append(("ih", imap_host))
    if imap_port:
        query += [("ip", str(imap_port)), ("is", "ssl")]
    if smtp_host:
        query.append(("sh", smtp_host))
    if smtp_port:
        query += [("sp", str(smtp_port)), ("ss", "ssl")]
    if accept_invalid_certs:
        query.append(("ic", "3"))
    q = "&".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in query)
    return f"dclogin:{urllib.parse.quote(addr, safe='@[]')}?{q}"


def dcaccount_url(host: str) -> str:
    return f"DCACCOUNT:https://{host}/new"


def host_is_ip(host: str) -> str | None:
    """The IP address of a Host header value (``1.2.3.4:443``, ``[::1]:8443``), else None."""
    host = host.strip()
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        name = host.split(":", 1)[0]
    else:
        name = host
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None


@dataclass(frozen=True)
class Audience:
    """How the client reached us: the host its links name, and the IP when that is one."""

    host: str
    ip: str | None


def audience(config: Config, host_header: str | None) -> Audience:
    """Links name the relay's own domain, not a client-supplied Host; only a relay
    reached by IP address (no DNS, like ``make run``) is named as the client reached it."""
    host = (host_header or "").strip()
    ip = host_is_ip(host) if host and re.fullmatch(r"[\w.:\[\]]+", host) else None
    if ip:
        return Audience(host, ip)
    return Audience(config.mail_domain.strip("[]"), None)


def account_link(config: Config, addr: str, password: str, ip: str | None) -> str:
    """The ``dclogin:`` link of new credentials; reached by IP it names the IP and ports."""
    if ip:
        return dclogin_url(
            addr,
            password,
            imap_host=ip,
            imap_port=config.imaps_port,
            smtp_host=ip,
            smtp_port=config.submissions_port,
        )
    return dclogin_url(
        addr, password, accept_invalid_certs=config.tls_external_cert_and_key is None
    )


def new_account(config: Config, who: Audience) -> tuple[dict[str, str], str]:
    """The JSON answer of POST /new, and the address issued (for the log)."""
    addr, password = generate_credentials(config)
    link = account_link(config, addr, password, who.ip)
    return {"email": addr, "password": password, "dclogin_url": link}, addr


@dataclass
class RateLimiter:
    """Token bucket per key: ``rate`` tokens per second, at most ``burst``."""

    rate: float = 2.0
    burst: float = 5.0
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return False
        self.buckets[key] = (tokens - 1, now)
        if len(self.buckets) > 100_000:
            # a bucket that has refilled is the same as no bucket: forget those
            self.buckets = {
                k: (t, at)
                for k, (t, at) in self.buckets.items()
                if t + (now - at) * self.rate < self.burst
            }
        return True


def is_fresh(request: web.BaseRequest, etag: str, mtime: float | None = None) -> bool:
    """Whether the client's cached copy is current (If-None-Match, else If-Modified-Since)."""
    match = request.headers.get("If-None-Match")
    if match is not None:
        return match.strip() == "*" or etag in [t.strip() for t in match.split(",")]
    since = request.headers.get("If-Modified-Since")
    if since and mtime is not None:
        try:
            when = email.utils.parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError, OverflowError):
            return False
        return int(mtime) <= when
    return False


@functools.lru_cache(maxsize=16)
def invite_svg_document(invite: str) -> bytes:
    # a relay has one invite per name it is reached by: drawn once each
    return qr_svg_document(invite, title=invite)


# ---------------------------------------------------------------- the web application


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FrontDoor:
    """Request handlers with the relay's config; ``app()`` wires them up."""

    def __init__(self, config: Config, log: logging.Logger | None = None) -> None:
        self.config = config
        self.log = log or logging.getLogger("chatmail-newemail")
        self.limiter = RateLimiter()
        self.www_folder = self._site_folder(config.www_folder)
        self.csp = pages.content_security_policy()
        self.info = pages.info_page(config)
        self.privacy = pages.privacy_page(config)
        own = dcaccount_url(pages.public_name(config))
        # the home page of the relay's own name is always the same: made once
        self.home = pages.home_page(config, own, own, by_ip=False)

    def _site_folder(self, folder: str) -> str | None:
        if not folder:
            return None
        if not os.path.isdir(folder):
            # /new must stay up: the built-in pages stand in, and the log says why
            self.log.error(
                "www_folder %s is not a directory this daemon can see (the unit hides "
                "/home and /root); serving the built-in pages",
                folder,
            )
            return None
        return folder

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.headers_middleware])
        r = app.router
        r.add_get("/new", self.new_redirect)
        r.add_post("/new", self.new_post)
        r.add_post("/cgi-bin/newemail.py", self.new_post)
        r.add_get("/invite.svg", self.invite_svg)
        if self.www_folder:
            r.add_get("/{path:.*}", self.site_file)
        else:
            for path in ("/", "/index.html"):
                r.add_get(path, self.page_handler(self.home, self.home_by_ip))
            r.add_get("/info.html", self.page_handler(self.info))
            r.add_get("/privacy.html", self.page_handler(self.privacy))
        return app

    @web.middleware
    async def headers_middleware(self, request: web.Request, handler: Handler):
        guard = guard_of(request.protocol)
        if guard is not None:
            guard.request_started()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self._common_headers(exc)
            raise
        self._common_headers(response)
        return response

    @staticmethod
    def _common_headers(response: web.StreamResponse) -> None:
        h = response.headers
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault("Cache-Control", "no-store")
        h["Server"] = "chatmaild"

    # -- /new

    def _client_ip(self, request: web.BaseRequest) -> str:
        return request.remote or "local"

    def _rate_limited(self, request: web.BaseRequest) -> web.Response | None:
        ip = self._client_ip(request)
        if self.limiter.allow(ip):
            return None
        self.log.info("rate limited: %s", ip)
        return web.Response(status=429, text="slow down\n", headers={"Retry-After": "1"})

    async def new_redirect(self, request: web.Request) -> web.StreamResponse:
        if (limited := self._rate_limited(request)) is not None:
            return limited
        who = audience(self.config, request.headers.get("Host"))
        return web.Response(status=301, headers={"Location": dcaccount_url(who.host)})

    async def new_post(self, request: web.Request) -> web.StreamResponse:
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_BODY_BYTES, actual_size=request.content_length or 0
            )
        if (limited := self._rate_limited(request)) is not None:
            return limited
        data, addr = new_account(self.config, audience(self.config, request.headers.get("Host")))
        self.log.info("issued credentials for %s to %s", addr, self._client_ip(request))
        return web.json_response(data, headers={"Cache-Control": "no-store"})

    # -- pages

    def home_by_ip(self, request: web.BaseRequest) -> pages.Page | None:
        """The home page for a client that reached us by IP: a fresh ready account each
        time (None when it used a name)."""
        who = audience(self.config, request.headers.get("Host"))
        if who.ip is None:
            return None
        addr, password = generate_credentials(self.config)
        self.log.info("issued credentials for %s to %s", addr, self._client_ip(request))
        link = account_link(self.config, addr, password, who.ip)
        return pages.home_page(self.config, dcaccount_url(who.host), link, by_ip=True)

    def page_handler(
        self,
        fixed: pages.Page,
        per_request: Callable[[web.BaseRequest], pages.Page | None] | None = None,
    ) -> Handler:
        """Serve ``fixed``, unless ``per_request`` makes a page for this request."""

        async def handler(request: web.Request) -> web.StreamResponse:
            page = per_request(request) if per_request else None
            if page is not None:
                # holds credentials made for this visit: never cached, never revalidated
                return self._page_response(request, page, "no-store")
            return self._page_response(
                request, fixed, f"public, max-age={PAGE_MAX_AGE}", page_etag=True
            )

        return handler

    def _page_response(
        self, request: web.BaseRequest, page: pages.Page, cache: str, page_etag: bool = False
    ) -> web.Response:
        headers = {"Cache-Control": cache, "Content-Security-Policy": self.csp}
        if page_etag:
            headers["ETag"] = page.etag
            if is_fresh(request, page.etag):
                return web.Response(status=304, headers=headers)
        return web.Response(
            body=page.body, content_type=page.content_type, charset="utf-8", headers=headers
        )

    async def invite_svg(self, request: web.Request) -> web.StreamResponse:
        invite = dcaccount_url(audience(self.config, request.headers.get("Host")).host)
        body = invite_svg_document(invite)
        return web.Response(
            body=body,
            content_type="image/svg+xml",
            headers={"Cache-Control": f"public, max-age={PAGE_MAX_AGE}"},
        )

    # -- www_folder

    async def site_file(self, request: web.Request) -> web.StreamResponse:
        assert self.www_folder is not None
        found = static.lookup(self.www_folder, request.path)
        if isinstance(found, static.Redirect):
            return web.Response(status=301, headers={"Location": found.location})
        # (a response is a mapping, so an empty one is falsy: compare with None)
        if found is not None and (response := await self._send_file(request, found)) is not None:
            return response
        page404 = static.not_found_page(self.www_folder)
        if page404 is not None:
            response = await self._send_file(request, page404, 404)
            if response is not None:
                return response
        raise web.HTTPNotFound()

    async def _send_file(
        self, request: web.Request, found: static.Found, status: int = 200
    ) -> web.StreamResponse | None:
        opened = static.open_file(found)
        if opened is None:
            return None
        fd, st = opened
        with open(fd, "rb") as f:
            etag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
            headers = {"Cache-Control": "public, max-age=300", "ETag": etag}
            if status == 200 and is_fresh(request, etag, st.st_mtime):
                return web.Response(status=304, headers=headers)
            response = web.StreamResponse(status=status, headers=headers)
            response.content_type = static.content_type(found.path)
            response.content_length = st.st_size
            response.last_modified = st.st_mtime
            await response.prepare(request)
            try:
                if request.method != "HEAD":
                    # local reads are short; a slow client blocks only its own coroutine
                    while chunk := f.read(64 * 1024):
                        await response.write(chunk)
                await response.write_eof()
            except ConnectionError:
                # the client left, or its connection was cut: nothing to log as an error
                self.log.debug("connection lost while sending %s", request.path)
            return response


# ---------------------------------------------------------------- daemon


class QuietBadRequests(logging.Filter):
    """aiohttp logs every malformed request with a traceback at ERROR level; on a
    public port that is noise from scanners: one debug line is enough."""

    def __init__(self, log: logging.Logger) -> None:
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            self.log.debug("bad request: %s", exc)
            return False
        return True


class NewEmailDaemon(Daemon):
    name = "chatmail-newemail"

    def __init__(self, config: Config, args: argparse.Namespace | None = None) -> None:
        super().__init__(config, args)
        cert, key = config.tls_external_cert_and_key or DEFAULT_TLS
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self.tls.load_cert_chain(cert, key)
        self.request_timeout = getattr(args, "request_timeout", REQUEST_TIMEOUT)
        self.connection_timeout = getattr(args, "connection_timeout", CONNECTION_TIMEOUT)
        self.stop_timeout = getattr(args, "stop_timeout", 30.0)
        self.front = FrontDoor(config, self.log)
        self.runner: web.AppRunner | None = None

    def ssl_context(self) -> ssl.SSLContext:
        return self.tls

    def endpoint(self) -> Endpoint:
        # every interface (the relay's public onboarding); --listen narrows it
        return Endpoint.tcp(
            "0.0.0.0" if self.config.disable_ipv6 else "::", self.config.newemail_port
        )

    async def start(self) -> None:
        http_log = logging.getLogger(f"{self.name}.http")
        http_log.addFilter(QuietBadRequests(self.log))
        self.runner = web.AppRunner(
            self.front.app(),
            handle_signals=False,
            access_log=None,
            logger=http_log,
            keepalive_timeout=self.request_timeout,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADER_FIELDS,
            lingering_time=LINGER_SECONDS,
        )
        await self.runner.setup()

    def protocol_factory(self) -> Callable[[], ConnectionGuard]:
        assert self.runner is not None and self.runner.server is not None
        server = self.runner.server

        def guarded() -> ConnectionGuard:
            return ConnectionGuard(
                server(),
                header_timeout=self.request_timeout,
                lifetime=self.connection_timeout,
                max_request_bytes=MAX_HEADER_BYTES + MAX_BODY_BYTES,
            )

        return guarded

    async def stop(self) -> None:
        if self.runner is None:
            return
        if self.runner.server is not None:
            # requests in flight finish (bounded), idle keep-alive connections close
            await self.runner.server.shutdown(self.stop_timeout)
        await self.runner.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=REQUEST_TIMEOUT,
        metavar="SECONDS",
        help="time to send a request header, and idle time between requests (default: %(default)s)",
    )
    parser.add_argument(
        "--connection-timeout",
        type=float,
        default=CONNECTION_TIMEOUT,
        metavar="SECONDS",
        help="longest time a connection stays open (default: %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    return run_daemon(NewEmailDaemon, __doc__, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
