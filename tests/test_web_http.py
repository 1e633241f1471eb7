"""chatmail-newemail as a process on a TLS port: HTTP edge cases, limits, www_folder, stop.

The daemon runs with --request-timeout 1 and --connection-timeout 4 so the
time limits show within seconds; every test talks raw bytes or http.client
over TLS to it, as any client on the Internet could.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatmaild.common.config import write_config
from chatmaild.relay import client_tls_context
from chatmaild.relay.ports import free_ports
from chatmaild.web import server as web_server
from tests.sandbox import world_readable_tempdir

ROOT = Path(__file__).resolve().parents[1]
HOST = "chat.example"
BIG_FILE_BYTES = 32 * 2**20


class NewEmail:
    """One chatmail-newemail process with its own ini, certificate and log."""

    def __init__(self, base: Path, extra_args: list[str] | None = None, **params: object) -> None:
        base.mkdir(parents=True, exist_ok=True)
        cert, key = base / "cert.pem", base / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "30", "-subj", f"/CN={HOST}", "-keyout", str(key),
             "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        ini = write_config(
            base / "chatmail.ini",
            mail_domain=HOST,
            tls_external_cert_and_key=f"{cert} {key}",
            web_handshake_rate=1000,  # every test's connection comes from 127.0.0.1
            **params,
        )
        self.port = free_ports(1)[0]
        self.log_path = base / "newemail.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatmaild.web.main", "--config", str(ini),
                 "--listen", f"127.0.0.1:{self.port}", "--request-timeout", "1",
                 "--connection-timeout", "4", "--verbose", *(extra_args or [])],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while "listening on" not in self.log:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"newemail did not start:\n{self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=15)
        return client_tls_context().wrap_socket(sock)

    def exchange(self, raw: bytes) -> bytes:
        """Send ``raw`` and read until the daemon closes the connection."""
        with self.connect() as s:
            s.sendall(raw)
            return read_all(s)

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=client_tls_context(), timeout=15
        )
        try:
            conn.request(method, path, body=body, headers={"Host": HOST, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def wait_log(self, text: str, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def read_all(s: ssl.SSLSocket) -> bytes:
    """Everything until EOF; a reset (an aborted connection) ends it too."""
    chunks = []
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int | None:
    if not response.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
        return None
    return int(response.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    d = world_readable_tempdir("web-")
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture(scope="module")
def door(base) -> Iterator[NewEmail]:
    daemon = NewEmail(base / "pages", privacy_mail="privacy@chat.example", delete_mails_after=17)
    yield daemon
    assert daemon.stop() == 0, daemon.log
    # malformed requests are a debug line each, not an error with a traceback
    assert "Traceback" not in daemon.log and " ERROR " not in daemon.log, daemon.log


@pytest.fixture(scope="module")
def site(base) -> Iterator[NewEmail]:
    (base / "secret.txt").write_text("not for the web")
    www = base / "www"
    (www / "docs").mkdir(parents=True)
    (www / ".well-known").mkdir()
    (www / ".git").mkdir()
    (www / "index.html").write_text("<!doctype html><title>own site</title>operator's home")
    (www / "style.css").write_text("body{color:red}")
    (www / "docs" / "index.html").write_text("operator's docs")
    (www / "404.html").write_text("operator's not found page")
    (www / ".well-known" / "security.txt").write_text("Contact: mailto:sec@chat.example")
    (www / ".git" / "config").write_text("[core]")
    (www / "evil.example").mkdir()
    (www / "passwd-link").symlink_to("/etc/passwd")
    (www / "secret-link.txt").symlink_to(base / "secret.txt")
    (www / "out").symlink_to(base)
    os.mkfifo(www / "fifo")
    with open(www / "big.bin", "wb") as f:
        f.truncate(BIG_FILE_BYTES)
    daemon = NewEmail(base / "site", www_folder=www)
    yield daemon
    assert daemon.stop() == 0, daemon.log
    assert "Traceback" not in daemon.log, daemon.log


# ---------------------------------------------------------------- built-in pages


def test_pages_content_types_and_caching(door):
    status, headers, body = door.request("GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"DCACCOUNT:https://chat.example/new" in body
    assert headers["Cache-Control"] == "public, max-age=600"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, again, body304 = door.request("GET", "/", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body304 == b"" and again["ETag"] == headers["ETag"]
    status, headers, body = door.request("GET", "/info.html")
    assert status == 200 and b"<strong>17 days</strong>" in body
    status, headers, body = door.request("GET", "/privacy.html")
    assert status == 200 and b"mailto:privacy@chat.example" in body
    status, headers, body = door.request("GET", "/invite.svg")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml"
    assert body.startswith(b"<?xml") and b"<svg" in body
    status, headers, body = door.request("POST", "/new")
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Cache-Control"] == "no-store" and b'"dclogin_url"' in body


def test_page_by_ip_is_never_cached(door):
    status, headers, body = door.request("GET", "/", {"Host": f"127.0.0.1:{door.port}"})
    assert status == 200 and headers["Cache-Control"] == "no-store" and "ETag" not in headers
    assert f"DCACCOUNT:https://127.0.0.1:{door.port}/new".encode() in body
    assert b'href="dclogin:' in body


def test_head_is_get_without_body(door):
    _, get_headers, body = door.request("GET", "/info.html")
    raw = door.exchange(
        f"HEAD /info.html HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert status_of(raw) == 200 and rest == b""
    assert f"Content-Length: {len(body)}".encode() in head
    assert f"ETag: {get_headers['ETag']}".encode() in head


def test_unknown_paths_and_methods(door):
    assert door.request("GET", "/nothing-here")[0] == 404
    status, headers, _ = door.request("PUT", "/new")
    assert status == 405 and headers["Allow"] == "GET,HEAD,POST"
    status, headers, _ = door.request("DELETE", "/")
    assert status == 405 and headers["Allow"] == "GET,HEAD"
    status, headers, _ = door.request("POST", "/info.html")
    assert status == 405 and headers["Allow"] == "GET,HEAD"
    # the legacy path only creates accounts
    assert door.request("GET", "/cgi-bin/newemail.py")[0] == 405


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /new HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /new HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /new HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ],
)
def test_malformed_requests_get_400(door, raw):
    response = door.exchange(raw)
    assert status_of(response) == 400, response[:200]
    assert door.request("GET", "/")[0] == 200  # and the daemon serves on


def test_oversized_request_line_and_headers(door):
    long_path = "/" + "a" * 9000
    assert status_of(door.exchange(f"GET {long_path} HTTP/1.1\r\n\r\n".encode())) == 400
    long_value = "x" * 9000
    raw = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {long_value}\r\n\r\n".encode()
    assert status_of(door.exchange(raw)) == 400
    # each field within aiohttp's limits, together above the 80 KiB a request may
    # bring: the connection is cut before anything is answered
    fields = "".join(f"X-{i}: {'y' * 7000}\r\n" for i in range(12))
    assert door.exchange(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n{fields}\r\n".encode()) == b""
    # the same on a keep-alive connection, after a first request was answered
    many = "".join(f"X-{i}: {i}\r\n" for i in range(10000))
    with door.connect() as s:
        s.sendall(f"GET /info.html HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        first = s.recv(65536)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError, ssl.SSLError):
            s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n{many}\r\n".encode())
        rest = read_all(s)
    assert status_of(first) == 200 and b"HTTP/1.1 200" not in rest
    assert door.wait_log("request too large")


def test_body_over_limit_is_refused_unread(door):
    with door.connect() as s:
        s.sendall(b"POST /new HTTP/1.1\r\nHost: chat.example\r\nContent-Length: 100000000\r\n\r\n")
        response = read_all(s)
    assert status_of(response) == 413


def test_slow_first_request_is_cut_off(door):
    with door.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: chat.e")  # and then nothing
        assert read_all(s) == b""
    assert door.wait_log("no complete request header in time")


def test_slow_second_request_is_cut_off(door):
    with door.connect() as s:
        s.sendall(f"GET /info.html HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        first = s.recv(65536)
        assert status_of(first) == 200
        s.sendall(b"GET /privacy.html HTTP/1.1\r\nHo")  # keep-alive, then nothing
        rest = read_all(s)
    length = int(first.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert len(first.partition(b"\r\n\r\n")[2]) + len(rest) == length  # no second response


def test_stop_closes_idle_connections_and_exits_0(base):
    daemon = NewEmail(base / "stop")
    try:
        with daemon.connect() as idle:
            idle.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            assert status_of(idle.recv(65536)) == 200
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(timeout=30) == 0
            read_all(idle)  # closed: returns instead of hanging
    finally:
        daemon.stop()
    assert "stopped" in daemon.log


# ---------------------------------------------------------------- www_folder


def test_site_serves_the_operators_files(site):
    status, headers, body = site.request("GET", "/")
    assert status == 200 and body.endswith(b"operator's home")
    assert headers["Content-Type"] == "text/html" and "Content-Security-Policy" not in headers
    status, headers, body = site.request("GET", "/style.css")
    assert status == 200 and headers["Content-Type"] == "text/css" and body == b"body{color:red}"
    status, headers, body = site.request("GET", "/.well-known/security.txt")
    assert status == 200 and headers["Content-Type"] == "text/plain"
    status, headers, _ = site.request("GET", "/docs")
    assert status == 301 and headers["Location"] == "/docs/"
    assert site.request("GET", "/docs/")[2] == b"operator's docs"
    _, headers, _ = site.request("GET", "/style.css")
    status, _, body = site.request("GET", "/style.css", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""
    since = {"If-Modified-Since": headers["Last-Modified"]}
    assert site.request("GET", "/style.css", since)[0] == 304
    # /new and the QR code stay
    assert site.request("POST", "/new")[0] == 200
    assert site.request("GET", "/invite.svg")[0] == 200
    # what is missing gets the operator's 404 page
    status, _, body = site.request("GET", "/missing")
    assert status == 404 and body == b"operator's not found page"


def test_site_head_of_a_file(site):
    raw = site.exchange(
        f"HEAD /big.bin HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert status_of(raw) == 200 and rest == b""
    assert f"Content-Length: {BIG_FILE_BYTES}".encode() in head


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/docs/../../secret.txt",
        "/docs/%2e%2e/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/..\\secret.txt",
        "/secret-link.txt",
        "/passwd-link",
        "/out/secret.txt",
        "/.git/config",
        "/fifo",
    ],
)
def test_site_refuses_ways_out(site, path):
    raw = site.exchange(
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_of(raw) in (400, 404), raw[:200]
    assert b"not for the web" not in raw and b"root:" not in raw and b"[core]" not in raw


def test_site_redirect_stays_on_this_host(site):
    raw = site.exchange(
        f"GET //evil.example HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_of(raw) == 301 and b"\r\nLocation: /evil.example/\r\n" in raw


def test_connection_open_too_long_is_cut(site):
    """A client that stops reading a large file does not hold its connection forever."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(15)
    sock.connect(("127.0.0.1", site.port))
    with client_tls_context().wrap_socket(sock) as s:
        s.sendall(f"GET /big.bin HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert site.wait_log("connection open too long")
        received = len(read_all(s))
    assert received < BIG_FILE_BYTES


def test_a_steady_stream_of_connections_hands_the_heap_back(monkeypatch):
    """Not only after a crowd: every TRIM_EVERY closed connections, at most once a
    TRIM_INTERVAL, the freed heap goes back to the system (issue 24's soak)."""
    trims: list[float] = []

    async def main() -> None:
        https = web_server.HttpsServer(None, None, logging.getLogger("trim-test"))
        monkeypatch.setattr(https, "give_back_heap", lambda: trims.append(1.0))
        for _ in range(web_server.TRIM_EVERY):
            https.closed(object())
        https._tick()
        assert trims == []  # not yet a TRIM_INTERVAL since the start
        https.last_trim -= web_server.TRIM_INTERVAL
        https._tick()
        assert trims == [1.0]
        https._ticker.cancel()

    asyncio.run(main())
