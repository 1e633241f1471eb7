"""Onboarding endpoint: credentials, dclogin: encoding, HTTPS server with rate limit."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import string
import urllib.parse

import pytest

from chatmaild.config import parse_params
from chatmaild.newemail import (
    RateLimiter,
    dclogin_url,
    generate_credentials,
    handle_request,
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


def test_routes(config):
    resp, addr = handle_request(config, "GET", "/new", "chat.example")
    assert resp.status == 301 and resp.headers["Location"] == "DCACCOUNT:https://chat.example/new"
    assert addr is None
    # a forged Host header does not end up in the redirect; an IP (no DNS) does
    resp, _ = handle_request(config, "GET", "/new", "evil.example")
    assert resp.headers["Location"] == "DCACCOUNT:https://chat.example/new"
    resp, _ = handle_request(config, "GET", "/new", "127.0.0.1:8443")
    assert resp.headers["Location"] == "DCACCOUNT:https://127.0.0.1:8443/new"
    assert handle_request(config, "GET", "/other", None)[0].status == 404
    assert handle_request(config, "PUT", "/new", None)[0].status == 405
    resp, addr = handle_request(config, "POST", "/cgi-bin/newemail.py", "chat.example")
    data = json.loads(resp.body)
    assert resp.status == 200 and data["email"] == addr
    assert data["dclogin_url"].startswith(f"dclogin:{addr}?p=")


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
