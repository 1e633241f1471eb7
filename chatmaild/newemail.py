"""Onboarding endpoint: fresh random credentials over HTTPS at /new.

``POST /new`` answers JSON ``{"email": ..., "password": ..., "dclogin_url": ...}``
with a random address of this relay and a random password.  Nothing is
stored: the account comes into existence on the first IMAP/SMTP login with
these credentials.  ``GET /new`` redirects to ``dcaccount:https://<host>/new``
so that a Delta Chat app opening the link POSTs here itself.
``/cgi-bin/newemail.py`` is served like ``/new`` for QR codes printed long ago.

The localpart has ``username_max_length`` characters from a-z0-9, the
password ``password_min_length + 3`` characters from letters, digits and
punctuation; both come from the ``secrets`` RNG.

Requests are limited per client IP (token bucket: 2 per second, burst 5);
more get ``429 Too Many Requests``.

When the request's Host is an IP address (a relay without DNS, like
``make run``), the ``dclogin:`` link names that IP and the actual IMAP and
submission ports, so the app needs no DNS at all.

LOG LINES
    issued credentials for ADDR to IP
    rate limited: IP

FILES
    /etc/chatmail/chatmail.ini    configuration (mail_domain, newemail_port,
                                  tls_external_cert_and_key, username_max_length)
    /etc/chatmail/tls/{cert,key}.pem   certificate when no external one is configured

SIGNALS
    SIGTERM, SIGINT    finish requests in flight, then exit 0
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import secrets
import ssl
import string
import time
import urllib.parse
from dataclasses import dataclass, field

from .config import Config
from .service import Daemon, Endpoint, run_daemon

DEFAULT_TLS = ("/etc/chatmail/tls/cert.pem", "/etc/chatmail/tls/key.pem")
LOCALPART_ALPHABET = string.ascii_lowercase + string.digits
PASSWORD_ALPHABET = string.ascii_letters + string.digits + string.punctuation
NEW_PATHS = ("/new", "/cgi-bin/newemail.py")
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT = 10.0


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


@dataclass
class Response:
    status: int
    reason: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        head = [f"HTTP/1.1 {self.status} {self.reason}"]
        headers = {"Content-Length": str(len(self.body)), "Connection": "close", **self.headers}
        head += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


def json_response(status: int, reason: str, obj: object) -> Response:
    body = json.dumps(obj).encode() + b"\n"
    return Response(status, reason, body, {"Content-Type": "application/json"})


def handle_request(
    config: Config, method: str, path: str, host: str | None
) -> tuple[Response, str | None]:
    """The answer to one request, and the address issued (for the log)."""
    path = path.split("?", 1)[0]
    if path not in NEW_PATHS:
        return Response(404, "Not Found", b"not found\n"), None
    # the redirect names the relay's own domain; only a relay reached by IP
    # address (no DNS, like `make run`) is named as the client reached it
    ip_host = host if host and host_is_ip(host) and re.fullmatch(r"[\w.:\[\]]+", host) else None
    public = ip_host or config.mail_domain.strip("[]")
    if method == "GET" and path == "/new":
        return Response(301, "Moved Permanently", headers={"Location": dcaccount_url(public)}), None
    if method != "POST":
        return Response(405, "Method Not Allowed", headers={"Allow": "POST"}), None
    addr, password = generate_credentials(config)
    ip = host_is_ip(host) if host else None
    if ip:
        link = dclogin_url(
            addr,
            password,
            imap_host=ip,
            imap_port=config.imaps_port,
            smtp_host=ip,
            smtp_port=config.submissions_port,
        )
    else:
        link = dclogin_url(
            addr, password, accept_invalid_certs=config.tls_external_cert_and_key is None
        )
    return json_response(
        200, "OK", {"email": addr, "password": password, "dclogin_url": link}
    ), addr


# ---------------------------------------------------------------- daemon


class NewEmailDaemon(Daemon):
    name = "chatmail-newemail"

    def __init__(self, config: Config, args=None) -> None:
        super().__init__(config, args)
        cert, key = config.tls_external_cert_and_key or DEFAULT_TLS
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self.tls.load_cert_chain(cert, key)
        self.limiter = RateLimiter()

    def ssl_context(self) -> ssl.SSLContext:
        return self.tls

    def endpoint(self) -> Endpoint:
        # every interface (the relay's public onboarding); --listen narrows it
        return Endpoint.tcp(
            "0.0.0.0" if self.config.disable_ipv6 else "::", self.config.newemail_port
        )

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "local"
        try:
            request = await asyncio.wait_for(read_request(reader), REQUEST_TIMEOUT)
        except (ssl.SSLError, TimeoutError, ValueError, ConnectionError) as e:
            self.log.debug("bad request from %s: %s", ip, e)
            return
        if request is None:
            return
        method, path, headers = request
        with self.request():
            if not self.limiter.allow(ip):
                self.log.info("rate limited: %s", ip)
                response = Response(429, "Too Many Requests", b"slow down\n", {"Retry-After": "1"})
            else:
                response, addr = handle_request(self.config, method, path, headers.get("host"))
                if addr:
                    self.log.info("issued credentials for %s to %s", addr, ip)
            writer.write(response.encode())
            await writer.drain()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    """Request line and headers; a body (ignored) is read up to Content-Length."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise ValueError("request header too large") from None
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("request header too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"bad request line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length < 0 or length > MAX_BODY_BYTES:
        raise ValueError("request body too large")
    if length:
        await reader.readexactly(length)
    return parts[0].upper(), parts[1], headers


def main(argv: list[str] | None = None) -> int:
    return run_daemon(NewEmailDaemon, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
