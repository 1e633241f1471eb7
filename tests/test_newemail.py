"""Onboarding endpoint: credentials, dclogin: encoding, HTTPS server with rate limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import string
import urllib.parse

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatmaild.config import parse_params
from chatmaild.newemail import (
    FrontDoor,
    RateLimiter,
    audience,
    dclogin_url,
    generate_credentials,
    host_is_ip,
)
from chatmaild.relay import client_tls_context


@pytest.fixture
def config():
    return parse_params({"mail_domain": "chat.example", "username_max_length": "12"})


def test_generate_credentials(config):
    seen = set()
    for _ in range(50):
        addr, password = generate_credentials(config)
        local, domain = addr.split("@")
        assert domain == "chat.example"
        assert len(local) == 12 and set(local) <= set(string.ascii_lowercase + string.digits)
        assert len(password) == config.password_min_length + 3
        seen.add(addr)
    assert len(seen) == 50


def test_dclogin_percent_encoding():
    url = dclogin_url("abc@[1.2.3.4]", 'p@ss w+"%/\\&=?', imap_host="1.2.3.4", imap_port=993)
    assert url.startswith("dclogin:abc@[1.2.3.4]?p=p%40ss%20w%2B%22%25%2F%5C%26%3D%3F&v=1")
    assert "&ih=1.2.3.4&ip=993&is=ssl" in url and url.endswith("&ic=3")
    # the password survives a round trip through a standard query parser
    query = urllib.parse.parse_qs(url.split("?", 1)[1])
    assert query["p"] == ['p@ss w+"%/\\&=?']
    assert "ic=" not in dclogin_url("a@b.example", "x", accept_invalid_certs=False)


def test_host_is_ip():
    assert host_is_ip("127.0.0.1:8443") == "127.0.0.1"
    assert host_is_ip("127.0.0.1") == "127.0.0.1"
    assert host_is_ip("[::1]:443") == "::1"
    assert host_is_ip("chat.example") is None
    assert host_is_ip("chat.example:443") is None


def test_rate_limiter_burst_then_rate():
    lim = RateLimiter(rate=2, burst=5)
    assert all(lim.allow("1.2.3.4", now=100.0) for _ in range(5))
    assert not lim.allow("1.2.3.4", now=100.0)
    assert lim.allow("5.6.7.8", now=100.0)  # per IP
    assert lim.allow("1.2.3.4", now=100.5)  # one token after 0.5 s
    assert not lim.allow("1.2.3.4", now=100.5)


def ask(config, method, path, host=None):
    """One request to the front door's aiohttp application, in this process."""

    async def go():
        async with TestClient(TestServer(FrontDoor(config).app())) as client:
            headers = {"Host": host} if host else {}
            resp = await client.request(method, path, headers=headers, allow_redirects=False)
            return resp.status, resp.headers, await resp.read()

    return asyncio.run(go())


def test_audience_names_own_domain_or_ip(config):
    assert audience(config, "chat.example").host == "chat.example"
    # a forged Host header does not end up in links; an IP (no DNS) does
    assert audience(config, "evil.example") == audience(config, None)
    assert audience(config, "evil.example").ip is None
    who = audience(config, "127.0.0.1:8443")
    assert (who.host, who.ip) == ("127.0.0.1:8443", "127.0.0.1")
    assert audience(config, "127.0.0.1:8443/x\r\n").ip is None


def test_routes(config):
    status, headers, _ = ask(config, "GET", "/new", "chat.example")
    assert status == 301 and headers["Location"] == "DCACCOUNT:https://chat.example/new"
    _, headers, _ = ask(config, "GET", "/new", "evil.example")
    assert headers["Location"] == "DCACCOUNT:https://chat.example/new"
    _, headers, _ = ask(config, "GET", "/new", "127.0.0.1:8443")
    assert headers["Location"] == "DCACCOUNT:https://127.0.0.1:8443/new"
    assert ask(config, "GET", "/other")[0] == 404
    status, headers, _ = ask(config, "PUT", "/new")
    assert status == 405 and headers["Allow"] == "GET,HEAD,POST"
    status, headers, body = ask(config, "POST", "/cgi-bin/newemail.py", "chat.example")
    data = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert data["email"].endswith("@chat.example")
    assert data["dclogin_url"].startswith(f"dclogin:{data['email']}?p=")
    assert "ih=" not in data["dclogin_url"]
    # reached by IP, the link names that IP and the relay's TLS ports
    _, _, body = ask(config, "POST", "/new", "127.0.0.1:8443")
    query = urllib.parse.parse_qs(json.loads(body)["dclogin_url"].split("?", 1)[1])
    assert query["ih"] == ["127.0.0.1"] and query["ip"] == [str(config.imaps_port)]


def test_rate_limit_only_on_new(config):
    door = FrontDoor(config)
    door.limiter = RateLimiter(rate=1e-9, burst=5)  # no refill while the test runs

    async def go():
        async with TestClient(TestServer(door.app())) as client:
            pages = [(await client.get("/info.html")).status for _ in range(10)]
            news = [(await client.post("/new")).status for _ in range(7)]
            redirect = (await client.get("/new", allow_redirects=False)).status
            return pages, news, redirect

    pages, news, redirect = asyncio.run(go())
    assert set(pages) == {200}
    assert news == [200] * 5 + [429] * 2 and redirect == 429


def _post(relay, path="/new"):
    conn = http.client.HTTPSConnection(
        relay.host, relay.ports["newemail"], context=client_tls_context(), timeout=10
    )
    try:
        conn.request("POST", path, body=b"")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.relay
def test_new_over_https_creates_working_account(relay_factory):
    relay = relay_factory(components=["postfix", "dovecot", "doveauth", "newemail"])
    status, body = _post(relay)
    assert status == 200
    data = json.loads(body)
    assert data["email"].endswith("@" + relay.mail_domain)
    query = urllib.parse.parse_qs(data["dclogin_url"].split("?", 1)[1])
    assert query["p"] == [data["password"]]
    assert query["ip"] == [str(relay.ports["imaps"])] and query["ih"] == ["127.0.0.1"]
    # the credentials log in (and so create the account), punctuation and all
    relay.imap(data["email"], data["password"]).logout()
    # per-IP limit: the burst is 5, so 12 at once run into 429 (one after another, a slow
    # machine's handshakes would give the bucket time to refill)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = [status for status, _ in pool.map(lambda _: _post(relay), range(12))]
    assert 429 in statuses
    assert "rate limited: 127.0.0.1" in (relay.log_dir / "newemail.log").read_text()
