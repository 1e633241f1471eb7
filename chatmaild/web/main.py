"""The relay's web front door over HTTPS: home page with the invite QR code, and /new.

Routes (HEAD works wherever GET does, other methods get 405 with Allow):

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
``password_min_length + 3`` from letters, digits and punctuation (the
system's RNG, os.urandom).  Nothing is stored: the account comes into existence on the first
IMAP/SMTP login.  Credentials (/new, and the home page reached by IP) are
limited per client (IPv4 address or IPv6 /64): 2 a second, 5 at once; /new
then answers 429, the home page shows the invite without a ready account.

Links never name what the request's Host says: they name mail_domain; for an
IP-only relay (mail_domain an address) that address and newemail_port; and
for a relay with a name reached by IP address (no DNS, like ``make run``) the
address and port the client connected to.  Then the ``dclogin:`` link carries
the actual IMAP and submission ports, and the home page's button is such a
ready ``dclogin:`` account, because the app could not look the relay up by
name.  Pages and QR codes are drawn once per name or address.

Limits: connections open at once, in all and per client (web_max_connections,
web_max_connections_per_ip); a new connection must send its first byte within
--first-byte-timeout seconds (until then it holds no TLS state); TLS
handshakes in progress at once (web_max_handshakes) and a second per client
(web_handshake_rate), each done within 10 s; request line and each
header field 8190 bytes, at most 32 fields; at most 80 KiB received per
request (header and body; bodies are never read, and one above 64 KiB gets
413); the request header complete within --request-timeout seconds of the
handshake, which is also the idle time allowed between keep-alive requests; a
connection open --connection-timeout seconds at most.  What the limits refuse
is closed at once and logged once, then summarised once a minute.

Port 993 (imaps_port, role chatmail-imaps; --no-imaps leaves it to Dovecot) is
the IMAP front: the clients' TLS ends here and each connection goes on to
Dovecot's loopback listener imap_front_port, plaintext after a PROXY v2 header
with the client's address and an SSL entry (Dovecot counts it as secured).
Dovecot's imap-login then hands it to imap and holds nothing, so an idle device
costs OpenSSL's state here (17 KB on Debian 12, 26 KB on 13; 34 KB there with a
client that negotiates X25519MLKEM768) and a few KB in imap-hibernate.  Its
limits: before their handshake is done 4096 connections, 128 per client; 512
handshakes at once (past them a connection waits for a free one, within the
handshake timeout), 20 a second per client (burst 100); once passed on, the
mail connections (port 993 and port 443's tunnels together) are at most
max_imap_connections, 256 per client, fewer when the open-files limit cannot
hold two descriptors each.

LOG LINES
    issued credentials for ADDR to IP
    rate limited: IP
    rate limited: N more from M client(s) in the last 60 s
    too many connections: IP             (and the same summary line)
    connection limit reached: IP
    too many TLS handshakes in progress: IP
    TLS handshakes too fast: IP

FILES
    /etc/chatmail/chatmail.ini    configuration (mail_domain, newemail_port, web_*,
                                  tls_external_cert_and_key, www_folder, privacy_*,
                                  and the limits the info page shows)
    /etc/chatmail/tls/{cert,key}.pem   certificate when no external one is configured

SIGNALS
    SIGTERM, SIGINT    finish requests in flight, then exit 0
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import functools
import ipaddress
import json
import logging
import os
import random
import re
import ssl
import string
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from chatmaild.common import mtasts
from chatmaild.common.config import ACME_CHALLENGE_DIR, Config
from chatmaild.common.ratelimit import RateLimiter
from chatmaild.common.service import Daemon, Endpoint, run_daemons
from chatmaild.iroh.probe import probe_204_headers
from chatmaild.web import autoconfig, mxdeliv, pages, static
from chatmaild.web.limits import Admission, RefusalLog, SourceBudget, mail_budget, source_of
from chatmaild.web.plain import PlainHttp
from chatmaild.web.qr import QRCodes
from chatmaild.web.server import HttpsServer, Request, Response, Settings

LOCALPART_ALPHABET = string.ascii_lowercase + string.digits
PASSWORD_ALPHABET = string.ascii_letters + string.digits + string.punctuation
NEW_PATHS = ("/new", "/cgi-bin/newemail.py")
REQUEST_TIMEOUT = 10.0
CONNECTION_TIMEOUT = 300.0
FIRST_BYTE_TIMEOUT = 5.0
UPLOAD_GRACE = 30.0
PAGE_MAX_AGE = 600
JSON_TYPE = "application/json"
# credentials per client: 2 a second, 5 at once (/new and the home page reached by IP)
CREDENTIALS_PER_MINUTE = 120
CREDENTIALS_BURST = 5
# IMAP/SMTP clients passed on to Dovecot and Postfix (port 993's IMAP front, port
# 443's ALPN tunnels), each an IDLE connection for hours: at most max_imap_connections
# in all, and this many from one address (a school or company network behind one NAT)
MAIL_TUNNELS_PER_SOURCE = 256
# the IMAP front: handshakes in progress at once, and a second per source (a relay's
# restart brings every device back within seconds)
FRONT_MAX_HANDSHAKES = 512
FRONT_HANDSHAKES_PER_MINUTE = 1200
FRONT_HANDSHAKE_BURST = 100
# the IMAP front: connections not yet passed on (first byte, handshake, waiting for a
# handshake slot with at most QUEUED_HELLO bytes kept), in all and per source
FRONT_PENDING = 4096
FRONT_PENDING_PER_SOURCE = 128


# ---------------------------------------------------------------- pure logic


# os.urandom, what the secrets module uses (whose hmac import would load OpenSSL's hash
# table, 2 MB on Debian 13, for nothing this process needs)
RANDOM = random.SystemRandom()


def generate_credentials(config: Config) -> tuple[str, str]:
    """A random address of this relay and a random password."""
    local = "".join(RANDOM.choice(LOCALPART_ALPHABET) for _ in range(config.username_max_length))
    password = "".join(
        RANDOM.choice(PASSWORD_ALPHABET) for _ in range(config.password_min_length + 3)
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
    if not re.fullmatch(r"[\w.:\[\]]+", host):
        return None
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        name = host.split(":", 1)[0]
    else:
        name = host
    return ip_literal(name)


def ip_literal(name: str) -> str | None:
    """``name`` as a normalized IP address (IPv4-mapped IPv6 as IPv4), else None."""
    try:
        addr = ipaddress.ip_address(name.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def host_port(ip: str, port: int) -> str:
    """How a URL names ``ip`` and ``port`` (443 is https's own)."""
    host = f"[{ip}]" if ":" in ip else ip
    return host if port == 443 else f"{host}:{port}"


@dataclass(frozen=True)
class Audience:
    """How the client reached us: the host its links name, and the IP when that is one."""

    host: str
    ip: str | None


def audience(config: Config, host_header: str | None, local: tuple[str, int]) -> Audience:
    """What links name: always the relay's own name or address, never the request's.

    An IP-only relay (``mail_domain`` an address) names that address and
    ``newemail_port``.  A relay with a name, reached by IP address (no DNS, like
    ``make run``: the Host is an address), names the address and port the client
    connected to, ``local`` (the socket's own end: one of the machine's addresses,
    which no client chooses).  Otherwise: ``mail_domain``.
    """
    own = ip_literal(config.mail_domain)
    if own is not None:
        return Audience(host_port(own, config.newemail_port), own)
    if host_header and host_is_ip(host_header):
        ip = ip_literal(local[0])
        if ip is not None:
            return Audience(host_port(ip, local[1]), ip)
    return Audience(config.mail_domain, None)


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


def is_fresh(request: Request, etag: str, mtime: float | None = None) -> bool:
    """Whether the client's cached copy is current (If-None-Match, else If-Modified-Since)."""
    match = request.headers.get("if-none-match")
    if match is not None:
        return match.strip() == "*" or etag in [t.strip() for t in match.split(",")]
    since = request.headers.get("if-modified-since")
    if since and mtime is not None:
        try:
            when = email.utils.parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError, OverflowError):
            return False
        return int(mtime) <= when
    return False


def text_response(status: int, text: str, **headers: str) -> Response:
    return Response(status, {"Content-Type": "text/plain; charset=utf-8", **headers}, text.encode())


# ---------------------------------------------------------------- the web application


Handler = Callable[[Request], Awaitable[Response]]
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Server": "chatmaild",
}


class FrontDoor:
    """Request handlers with the relay's config: ``handle`` answers one request.

    Every page and QR code is drawn from the config, once per relay name or
    address; a request only picks one and, reached by IP, adds fresh credentials.
    """

    def __init__(
        self, config: Config, log: logging.Logger | None = None, also_draw: Iterable[str] = ()
    ) -> None:
        """``also_draw``: invites of addresses the relay is known to be reached by, whose
        codes are drawn now with the name's (one child process), not on a request."""
        self.config = config
        self.log = log or logging.getLogger("chatmail-newemail")
        self.limiter = RateLimiter(CREDENTIALS_PER_MINUTE, CREDENTIALS_BURST)
        self.refusals = RefusalLog(self.log)
        self.www_folder = self._site_folder(config.www_folder)
        self.csp = pages.content_security_policy()
        self.info = pages.info_page(config)
        self.privacy = pages.privacy_page(config)
        self.autoconfig_body = autoconfig.autoconfig_xml(config)
        self.codes = QRCodes()
        own = dcaccount_url(pages.public_name(config))
        # an IP-only relay's links name its port too
        ip_only = dcaccount_url(audience(config, None, ("", 0)).host)
        self.codes.draw_now(list(dict.fromkeys([own, ip_only, *also_draw])))
        # the home page of the relay's own name is always the same: made once
        self.home = pages.home_page(config, own, own, self.codes.codes[own][0], by_ip=False)
        self._invite_pages: dict[str, pages.Page] = {}
        self.routes = self._routes()

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

    def _routes(self) -> dict[str, dict[str, Handler]]:
        routes: dict[str, dict[str, Handler]] = {
            "/new": {"GET": self.new_redirect, "POST": self.new_post},
            "/cgi-bin/newemail.py": {"POST": self.new_post},
            "/invite.svg": {"GET": self.invite_svg},
        }
        routes[autoconfig.PATH] = {"GET": self.autoconfig}
        # the apps' probes of an iroh relay (its /relay goes to chatmail-iroh)
        routes["/generate_204"] = {"GET": self.generate_204}
        routes["/ping"] = {"GET": self.ping}
        if self.config.mxdeliv_receive:
            # POST is the server's (an upload, web.mxdeliv); here only the other methods' 405
            routes[mxdeliv.PATH] = {"POST": self.mxdeliv_not_here}
        if mtasts.applies(self.config):
            # what https://mta-sts.<mail_domain>/ serves (the certificate covers that name)
            routes[mtasts.PATH] = {"GET": self.mta_sts_policy}
        if not self.www_folder:
            home = self.page_handler(self.home, self.home_by_ip)
            routes["/"] = routes["/index.html"] = {"GET": home}
            routes["/info.html"] = {"GET": self.page_handler(self.info)}
            routes["/privacy.html"] = {"GET": self.page_handler(self.privacy)}
        return routes

    async def handle(self, request: Request) -> Response:
        methods = self.routes.get(request.path)
        if methods is None:
            if not self.www_folder:
                return text_response(404, "404: Not Found\n")
            methods = {"GET": self.site_file}
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            allowed = [m for m in ("GET", "HEAD", "POST") if m in methods or (
                m == "HEAD" and "GET" in methods)]  # fmt: skip
            return text_response(405, "405: Method Not Allowed\n", Allow=",".join(allowed))
        return await handler(request)

    # -- /new

    def _who(self, request: Request) -> Audience:
        return audience(self.config, request.host, request.local)

    def _credentials_allowed(self, request: Request) -> bool:
        if self.limiter.check(source_of(request.remote)) == 0:
            return True
        self.refusals.note("rate limited", request.remote)
        return False

    @staticmethod
    def _slow_down() -> Response:
        return text_response(429, "slow down\n", **{"Retry-After": "1"})

    async def new_redirect(self, request: Request) -> Response:
        if not self._credentials_allowed(request):
            return self._slow_down()
        return Response(301, {"Location": dcaccount_url(self._who(request).host)})

    async def new_post(self, request: Request) -> Response:
        if not self._credentials_allowed(request):
            return self._slow_down()
        data, addr = new_account(self.config, self._who(request))
        self.log.info("issued credentials for %s to %s", addr, request.remote)
        body = json.dumps(data).encode()
        return Response(200, {"Content-Type": f"{JSON_TYPE}; charset=utf-8"}, body)

    # -- pages

    async def home_by_ip(self, request: Request) -> pages.Page | Response | None:
        """The home page for a client that reached us by IP: a fresh ready account each
        time, while the client's credentials rate allows (None when it used a name)."""
        who = self._who(request)
        if who.ip is None:
            return None
        if self.config.is_ip_domain:
            return self._ip_only_home(request, who)
        invite = dcaccount_url(who.host)
        qr = (await self.codes.get(invite))[0]
        if not self._credentials_allowed(request):
            return self._invite_only(invite, qr)
        link = self._page_account(request, who)
        return pages.home_page(self.config, invite, link, qr, by_ip=True)

    def _page_account(self, request: Request, who: Audience) -> str:
        """The ``dclogin:`` link of fresh credentials for a page view."""
        addr, password = generate_credentials(self.config)
        # a page view, not worth a line each: the account exists only once it logs in
        self.log.debug("issued credentials for %s to %s", addr, request.remote)
        return account_link(self.config, addr, password, who.ip)

    def _ip_only_home(self, request: Request, who: Audience) -> pages.Page | Response:
        """An IP-only relay's home page: code, link and button are one fresh ``dclogin:``
        account that accepts the self-signed certificate (the apps open a ``DCACCOUNT:``
        link only with a certificate they trust: no CA certifies a bare address here)."""
        if not self._credentials_allowed(request):
            return text_response(
                429, "Too many new accounts for your address just now: reload in a few seconds.\n",
                **{"Retry-After": "1"},
            )  # fmt: skip
        from chatmaild.web.qr import page_svg  # drawn here: a new code on every visit

        link = self._page_account(request, who)
        return pages.home_page(self.config, link, link, page_svg(link), by_ip=True)

    def _invite_only(self, invite: str, qr: str) -> pages.Page:
        """The by-IP home page without an account: made once per address."""
        page = self._invite_pages.get(invite)
        if page is None:
            if len(self._invite_pages) >= 16:  # addresses of the relay: a handful
                self._invite_pages.clear()
            page = self._invite_pages[invite] = pages.home_page(
                self.config, invite, invite, qr, by_ip=True
            )
        return page

    def page_handler(
        self,
        fixed: pages.Page,
        per_request: Callable[[Request], Awaitable[pages.Page | Response | None]] | None = None,
    ) -> Handler:
        """Serve ``fixed``, unless ``per_request`` makes a page (or an answer) for this
        request."""

        async def handler(request: Request) -> Response:
            page = await per_request(request) if per_request else None
            if isinstance(page, Response):
                return page
            if page is not None:
                # holds credentials made for this visit: never cached, never revalidated
                return self._page_response(request, page, "no-store")
            return self._page_response(
                request, fixed, f"public, max-age={PAGE_MAX_AGE}", page_etag=True
            )

        return handler

    def _page_response(
        self, request: Request, page: pages.Page, cache: str, page_etag: bool = False
    ) -> Response:
        headers = {"Cache-Control": cache, "Content-Security-Policy": self.csp}
        if page_etag:
            headers["ETag"] = page.etag
            if is_fresh(request, page.etag):
                return Response(304, headers)
        headers["Content-Type"] = f"{page.content_type}; charset=utf-8"
        return Response(200, headers, page.body)

    async def mta_sts_policy(self, request: Request) -> Response:
        return text_response(
            200, mtasts.policy_text(self.config), **{"Cache-Control": "public, max-age=3600"}
        )

    async def mxdeliv_not_here(self, request: Request) -> Response:
        """Reached only where uploads are not streamed (a test's bare FrontDoor)."""
        return mxdeliv.answer(503, "temporary", "HTTPS delivery is not served here",
                              **{"Retry-After": mxdeliv.RETRY_AFTER})  # fmt: skip

    async def generate_204(self, request: Request) -> Response:
        return Response(204, probe_204_headers(request.headers), b"")

    async def ping(self, request: Request) -> Response:
        return Response(200, {"Access-Control-Allow-Origin": "*"}, b"")

    async def autoconfig(self, request: Request) -> Response:
        headers = {"Content-Type": f"{autoconfig.XML_TYPE}; charset=utf-8",
                   "Cache-Control": "public, max-age=3600"}  # fmt: skip
        return Response(200, headers, self.autoconfig_body)

    async def invite_svg(self, request: Request) -> Response:
        document = (await self.codes.get(dcaccount_url(self._who(request).host)))[1]
        return Response(
            200,
            {"Content-Type": "image/svg+xml", "Cache-Control": f"public, max-age={PAGE_MAX_AGE}"},
            document.encode(),
        )

    # -- www_folder

    async def site_file(self, request: Request) -> Response:
        assert self.www_folder is not None
        found = static.lookup(self.www_folder, request.path)
        if isinstance(found, static.Redirect):
            return Response(301, {"Location": found.location})
        if found is not None and (response := self._file(request, found)) is not None:
            return response
        page404 = static.not_found_page(self.www_folder)
        if page404 is not None and (response := self._file(request, page404, 404)) is not None:
            return response
        return text_response(404, "404: Not Found\n")

    def _file(self, request: Request, found: static.Found, status: int = 200) -> Response | None:
        opened = static.open_file(found)
        if opened is None:
            return None
        fd, st = opened
        etag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
        headers = {"Cache-Control": "public, max-age=300", "ETag": etag}
        if status == 200 and is_fresh(request, etag, st.st_mtime):
            os.close(fd)
            return Response(304, headers)
        headers["Content-Type"] = static.content_type(found.path)
        headers["Last-Modified"] = email.utils.formatdate(st.st_mtime, usegmt=True)
        return Response(status, headers, file=open(fd, "rb"), file_size=st.st_size)


# ---------------------------------------------------------------- daemon


class WebRole(Daemon):
    """A role of the web process served by an HttpsServer (made in start()): its
    connections, its stop, and its certificate, read again on SIGHUP."""

    # asyncio's own loop: the web port needs no more speed than it has (README,
    # "The web port"), and uvloop would cost 1.5 MB of RSS on Debian 13
    fast_loop = False
    uses_tls = True
    alpn: tuple[str, ...] = ()  # protocols the TLS offers (ALPN), none by default

    def __init__(self, config: Config, args: argparse.Namespace | None = None) -> None:
        super().__init__(config, args)
        self.tls = tls_context(config, self.alpn) if self.uses_tls else None
        self.stop_timeout = getattr(args, "stop_timeout", 30.0)
        self.server: HttpsServer | None = None

    def protocol_factory(self) -> Callable[[], asyncio.Protocol]:
        assert self.server is not None
        return self.server.protocol

    def mail_connections(self) -> SourceBudget:
        """The process's one budget of mail connections: port 993's front and port
        443's tunnels hold the same descriptors, so they count against the same limit."""
        budget = self.shared.get("mail_connections")
        if not isinstance(budget, SourceBudget):
            budget = self.shared["mail_connections"] = mail_connections(self.config, self.log)
        return budget

    def reload(self) -> None:
        """A renewed certificate (chatmail-acme sends SIGHUP): new connections get it,
        open ones keep theirs."""
        if not self.uses_tls:
            return
        self.tls = tls_context(self.config, self.alpn)
        if self.server is not None:
            self.server.tls = self.tls

    async def stop(self) -> None:
        if self.server is not None:
            # requests in flight finish (bounded), idle keep-alive connections close
            await self.server.shutdown(self.stop_timeout)


class NewEmailDaemon(WebRole):
    name = "chatmail-newemail"

    def __init__(self, config: Config, args: argparse.Namespace | None = None) -> None:
        super().__init__(config, args)
        arg = functools.partial(getattr, args)
        self.settings = Settings(
            first_byte_timeout=arg("first_byte_timeout", FIRST_BYTE_TIMEOUT),
            request_timeout=arg("request_timeout", REQUEST_TIMEOUT),
            lifetime=arg("connection_timeout", CONNECTION_TIMEOUT),
            upload_grace=arg("upload_grace", UPLOAD_GRACE),
        )
        self.front: FrontDoor | None = None

    def endpoint(self) -> Endpoint:
        # every interface (the relay's public onboarding); --listen narrows it
        return Endpoint.tcp(
            "0.0.0.0" if self.config.disable_ipv6 else "::", self.config.newemail_port
        )

    def _connection_budget(self) -> int:
        """web_max_connections, lowered when the open-files limit could not hold them
        (a page's connection may hold a socket and a file of www_folder)."""
        soft = open_files_limit()
        fit = (soft - 64) // 2
        wanted = self.config.web_max_connections
        if fit < wanted:
            self.log.warning(
                "open files limit %d holds %d connections, not web_max_connections = %d: "
                "serving at most %d (raise LimitNOFILE= to serve more)",
                soft, fit, wanted, max(fit, 1),
            )  # fmt: skip
            return max(fit, 1)
        return wanted

    async def start(self) -> None:
        # a relay reached by one address (make run's 127.0.0.1, an IP-only relay): its
        # by-IP invite drawn now, like the name's, not by a child process on a request
        endpoint = self.listen_endpoint
        ip = ip_literal(endpoint.host or "") if endpoint is not None else None
        local = []
        if endpoint is not None and ip is not None and not ipaddress.ip_address(ip).is_unspecified:
            local.append(dcaccount_url(host_port(ip, endpoint.port or 443)))
        self.front = FrontDoor(self.config, self.log, also_draw=local)
        c = self.config
        admission = Admission(
            max_connections=self._connection_budget(),
            tunnels=self.mail_connections(),
            max_per_source=c.web_max_connections_per_ip,
            max_handshakes=c.web_max_handshakes,
            handshakes_per_minute=60 * c.web_handshake_rate,
            handshake_burst=2 * c.web_handshake_rate,
        )
        # one summary of refusals for the server's limits and the front door's
        host = getattr(self.args, "tunnel_host", None) or "127.0.0.1"
        routes = {"imap": (host, c.imaps_tunnel_port), "smtp": (host, c.submissions_tunnel_port)}
        uploads = {}
        if c.mxdeliv_receive:  # else: 404, as where the route does not exist (port 25 then)
            uploads[mxdeliv.PATH] = mxdeliv.MxDeliv(c, self.log, (host, c.smtp_tunnel_port))
        upgrades = {}
        if c.iroh_relay_port:  # chatmail-iroh, our own iroh relay
            iroh_host = getattr(self.args, "iroh_host", None) or "127.0.0.1"
            upgrades["/relay"] = (iroh_host, c.iroh_relay_port)
        self.server = HttpsServer(
            self.front.handle, self.tls, self.log, self.settings, admission, COMMON_HEADERS,
            refusals=self.front.refusals, mail_routes=routes, uploads=uploads,
            upgrades=upgrades,
        )  # fmt: skip


class PlainHttpDaemon(WebRole):
    """Port 80 (http_port): ACME challenges and redirects, in the web process."""

    name = "chatmail-http"
    uses_tls = False

    def __init__(self, config: Config, args: argparse.Namespace | None = None) -> None:
        super().__init__(config, args)
        challenges = getattr(args, "acme_challenges", None) or ACME_CHALLENGE_DIR
        self.app = PlainHttp(config, Path(challenges))

    def endpoint(self) -> Endpoint:
        return Endpoint.tcp("0.0.0.0" if self.config.disable_ipv6 else "::", self.config.http_port)

    async def start(self) -> None:
        c = self.config
        # its own budget: a crowd on port 80 cannot take the HTTPS port's connections
        admission = Admission(
            max_connections=max(1, min(256, c.web_max_connections // 4)),
            max_per_source=c.web_max_connections_per_ip,
        )
        self.server = HttpsServer(self.app.handle, None, self.log, Settings(), admission,
                                  COMMON_HEADERS)  # fmt: skip


class ImapsFront(WebRole):
    """Port 993 (imaps_port), in the web process: the IMAP clients' TLS ends here and
    Dovecot gets the plaintext on loopback (imap_front_port) after a PROXY v2 header
    naming the client and its TLS.  So Dovecot's imap-login hands each connection to
    its imap process and holds nothing, and a hibernated device costs a few KB there
    instead of imap-login's ~70 KB of TLS state (README, "Idle devices")."""

    name = "chatmail-imaps"
    alpn = ("imap",)

    def endpoint(self) -> Endpoint:
        return Endpoint.tcp("0.0.0.0" if self.config.disable_ipv6 else "::", self.config.imaps_port)

    async def start(self) -> None:
        c = self.config
        host = getattr(self.args, "tunnel_host", None) or "127.0.0.1"
        # connections not yet passed on (before and in their handshake): their own
        # budget; once passed on, the mail connections' (shared with port 443's)
        admission = Admission(
            max_connections=FRONT_PENDING,
            max_per_source=FRONT_PENDING_PER_SOURCE,
            max_handshakes=FRONT_MAX_HANDSHAKES,
            handshakes_per_minute=FRONT_HANDSHAKES_PER_MINUTE,
            handshake_burst=FRONT_HANDSHAKE_BURST,
            tunnels=self.mail_connections(),
        )
        # a relay's restart brings every device back at once: past the handshakes
        # in progress they wait their turn, not refused
        self.server = HttpsServer(self._no_http, self.tls, self.log, Settings(), admission,
                                  terminate_to=(host, c.imap_front_port),
                                  queue_handshakes=True)  # fmt: skip

    @staticmethod
    async def _no_http(request: Request) -> Response:  # never asked: no HTTP here
        return text_response(400, "IMAP only\n")


def open_files_limit() -> int:
    """The process's open-files limit: run_daemons has raised the soft one to the hard
    one already (service.raise_fd_limit)."""
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def mail_connections(config: Config, log: logging.Logger) -> SourceBudget:
    """A process's budget of IMAP/SMTP connections passed on to Dovecot and Postfix:
    max_imap_connections, lowered when the open-files limit cannot hold two sockets
    each beside the pages' web_max_connections."""
    soft = open_files_limit()
    fit = max(0, (soft - 64 - 2 * config.web_max_connections) // 2)
    limit = min(config.max_imap_connections, fit)
    if limit < config.max_imap_connections:
        log.warning(
            "open files limit %d holds %d IMAP/SMTP connections, not max_imap_connections"
            " = %d (raise LimitNOFILE= to serve more)",
            soft, limit, config.max_imap_connections,
        )  # fmt: skip
    return mail_budget(limit, MAIL_TUNNELS_PER_SOURCE)


def tls_context(config: Config, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    cert, key = config.tls_cert_and_key
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    limits = [
        ("--request-timeout", float, REQUEST_TIMEOUT, "SECONDS",
         "time to send a request header, and idle time between requests"),
        ("--connection-timeout", float, CONNECTION_TIMEOUT, "SECONDS",
         "longest time a connection stays open"),
        ("--first-byte-timeout", float, FIRST_BYTE_TIMEOUT, "SECONDS",
         "time a new connection may stay silent before its TLS handshake"),
        ("--upload-grace", float, UPLOAD_GRACE, "SECONDS",
         "time an upload (POST /mxdeliv) may take beyond its size at 32 KiB/s"),
    ]  # fmt: skip
    for flag, kind, default, metavar, text in limits:
        parser.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default: %(default)s)"
        )
    parser.add_argument(
        "--acme-challenges",
        default=str(ACME_CHALLENGE_DIR),
        metavar="DIR",
        help="where chatmail-acme puts the answers to HTTP-01 challenges (default: %(default)s)",
    )
    parser.add_argument(
        "--tunnel-host",
        default="127.0.0.1",
        metavar="ADDR",
        help="loopback address of Dovecot's and Postfix's listeners for IMAP and SMTP "
        "clients on this port (imaps_tunnel_port, submissions_tunnel_port; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--iroh",
        action="store_true",
        help="also serve the iroh relay (role chatmail-iroh) on 127.0.0.1:iroh_relay_port,"
        " where HTTPS /relay goes",
    )
    parser.add_argument(
        "--iroh-host",
        default="127.0.0.1",
        metavar="ADDR",
        help="loopback address of chatmail-iroh (iroh_relay_port), where HTTPS /relay"
        " goes (default: %(default)s)",
    )
    parser.add_argument(
        "--no-http",
        action="store_true",
        help="serve HTTPS only, not http_port (ACME challenges and redirects)",
    )
    parser.add_argument(
        "--no-imaps",
        action="store_true",
        help="leave imaps_port to Dovecot's own TLS: no IMAP front (role chatmail-imaps)",
    )


def _roles(args: argparse.Namespace) -> list[type[Daemon]]:
    """HTTPS; port 80 unless --no-http; the IMAP front on port 993 unless --no-imaps.
    With --listen, port 80 and the front only where it names their sockets
    (``--listen HOST:PORT`` alone is the HTTPS socket, as before they were served)."""
    roles: list[type[Daemon]] = [NewEmailDaemon]
    for role, off in ((PlainHttpDaemon, args.no_http), (ImapsFront, args.no_imaps)):
        named = any(v.startswith(f"{role.name}=") for v in args.listen)
        if not off and (named or not args.listen):
            roles.append(role)
    return roles


def _config_roles(config: Config, args: argparse.Namespace) -> list[type[Daemon]]:
    """The iroh relay, when asked for (--iroh, or --listen chatmail-iroh=...) and
    iroh_relay_port is not 0: realtime apps' traffic comes through this process's
    port 443 anyway, and a process of its own would cost an interpreter (README,
    "Memory")."""
    named = any(v.startswith("chatmail-iroh=") for v in args.listen)
    if not (args.iroh or named) or not config.iroh_relay_port:
        return []
    from chatmaild.iroh.main import IrohRelay

    return [IrohRelay]


def main(argv: list[str] | None = None) -> int:
    return run_daemons(NewEmailDaemon.name, _roles, __doc__, argv, add_arguments, _config_roles)


if __name__ == "__main__":
    raise SystemExit(main())
