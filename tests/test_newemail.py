"""Onboarding endpoint: credentials, dclogin: encoding, HTTPS server with rate limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import http.client
import json
import logging
import re
import string
import urllib.parse

import pytest

from chatmaild.common.config import parse_params
from chatmaild.common.ratelimit import RateLimiter
from chatmaild.relay import client_tls_context
from chatmaild.web.main import (
    FrontDoor,
    audience,
    dclogin_url,
    generate_credentials,
    host_is_ip,
)
from chatmaild.web.server import Request


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


def ask(config, method, path, host=None, local=("127.0.0.1", 8443), door=None, remote="10.0.0.1"):
    """One request to the front door's handlers, in this process."""
    door = door or FrontDoor(config)
    headers = {"host": host} if host else {}
    request = Request(method, path, "", headers, remote=remote, local=local)
    response = asyncio.run(door.handle(request))
    return response.status, response.headers, response.body


def test_audience_names_own_domain_or_ip(config):
    here = ("127.0.0.1", 8443)
    assert audience(config, "chat.example", here).host == "chat.example"
    # a forged Host header does not end up in links
    assert audience(config, "evil.example", here) == audience(config, None, here)
    assert audience(config, "evil.example", here).ip is None
    # reached by IP address: the address and port the client connected to
    who = audience(config, "127.0.0.1:8443", here)
    assert (who.host, who.ip) == ("127.0.0.1:8443", "127.0.0.1")
    assert audience(config, "127.0.0.1:8443/x\r\n", here).ip is None
    # whatever address and port the Host names: ours, not its
    for forged in ("127.0.0.1:" + "9" * 2270, "10.9.9.9", "[::1]:1", "127.0.0.1:8443x"):
        assert audience(config, forged, here).host in ("127.0.0.1:8443", "chat.example")
    assert audience(config, "1.2.3.4", ("::ffff:192.0.2.7", 443)).host == "192.0.2.7"
    assert audience(config, "[::1]", ("2001:db8::1", 8443)).host == "[2001:db8::1]:8443"


def test_audience_of_an_ip_only_relay_is_its_address():
    config = parse_params({"mail_domain": "[192.0.2.5]", "newemail_port": "443"})
    for host in ("192.0.2.5", "evil.example", "10.0.0.1:8443", None):
        who = audience(config, host, ("10.0.0.9", 8443))
        assert (who.host, who.ip) == ("192.0.2.5", "192.0.2.5")


def test_routes(config):
    status, headers, _ = ask(config, "GET", "/new", "chat.example")
    assert status == 301 and headers["Location"] == "DCACCOUNT:https://chat.example/new"
    _, headers, _ = ask(config, "GET", "/new", "evil.example")
    assert headers["Location"] == "DCACCOUNT:https://chat.example/new"
    _, headers, _ = ask(config, "GET", "/new", "127.0.0.1:8443")
    assert headers["Location"] == "DCACCOUNT:https://127.0.0.1:8443/new"
    _, headers, _ = ask(config, "GET", "/new", "127.0.0.1:" + "1" * 2270)
    assert headers["Location"] == "DCACCOUNT:https://127.0.0.1:8443/new"
    assert ask(config, "GET", "/other")[0] == 404
    status, headers, _ = ask(config, "PUT", "/new")
    assert status == 405 and headers["Allow"] == "GET,HEAD,POST"
    status, headers, body = ask(config, "POST", "/cgi-bin/newemail.py", "chat.example")
    data = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert data["email"].endswith("@chat.example")
    assert data["dclogin_url"].startswith(f"dclogin:{data['email']}?p=")
    assert "ih=" not in data["dclogin_url"]
    # reached by IP, the link names that IP and the relay's TLS ports
    _, _, body = ask(config, "POST", "/new", "127.0.0.1:8443")
    query = urllib.parse.parse_qs(json.loads(body)["dclogin_url"].split("?", 1)[1])
    assert query["ih"] == ["127.0.0.1"] and query["ip"] == [str(config.imaps_port)]


def test_rate_limit_only_on_credentials(config):
    door = FrontDoor(config)
    door.limiter = RateLimiter(1, 5)  # one a minute: no refill while the test runs
    pages = [ask(config, "GET", "/info.html", door=door)[0] for _ in range(10)]
    news = [ask(config, "POST", "/new", door=door)[0] for _ in range(7)]
    redirect = ask(config, "GET", "/new", door=door)[0]
    assert set(pages) == {200}
    assert news == [200] * 5 + [429] * 2 and redirect == 429
    # another client has its own budget
    assert ask(config, "POST", "/new", door=door, remote="10.0.0.2")[0] == 200


def test_home_by_ip_issues_accounts_at_a_bounded_rate(config, caplog):
    caplog.set_level(logging.DEBUG, logger="chatmail-newemail")
    door = FrontDoor(config)
    door.limiter = RateLimiter(1, 5)
    bodies = [ask(config, "GET", "/", "127.0.0.1", door=door)[2] for _ in range(8)]
    with_account = [b for b in bodies if b'href="dclogin:' in b]
    assert len(with_account) == 5  # the burst; then the invite without an account
    assert all(b"DCACCOUNT:https://127.0.0.1:8443/new" in b for b in bodies)
    # a page view is no INFO line; the refusals are one line, then a summary
    issued = [r for r in caplog.records if "issued credentials" in r.getMessage()]
    assert len(issued) == 5 and {r.levelno for r in issued} == {logging.DEBUG}
    limited = [r.getMessage() for r in caplog.records if "rate limited" in r.getMessage()]
    assert limited == ["rate limited: 10.0.0.1"]
    door.refusals.flush()
    assert "rate limited: 2 more from 1 client(s) in the last 60 s" in caplog.text


def test_ip_only_home_page_code_and_button_are_a_fresh_account():
    """No CA certifies a bare address, and the apps open a DCACCOUNT: link only with a
    trusted certificate: the code itself is the dclogin: account (ic=3), new each visit."""
    config = parse_params({"mail_domain": "[192.0.2.5]", "newemail_port": "443"})
    door = FrontDoor(config)
    door.limiter = RateLimiter(1, 2)
    links = []
    for _ in range(2):
        status, headers, body = ask(config, "GET", "/", "evil.example", door=door)
        assert status == 200 and headers["Cache-Control"] == "no-store"
        page = body.decode()
        [link] = {html.unescape(h) for h in re.findall(r'href="(dclogin:[^"]+)"', page)}
        assert f"<title>QR code: {html.escape(link)}</title>" in page
        assert "DCACCOUNT:" not in page
        query = urllib.parse.parse_qs(link.split("?", 1)[1])
        assert query["ih"] == ["192.0.2.5"] and query["ic"] == ["3"]
        links.append(link)
    assert links[0] != links[1]
    # past the client's rate: no account and no code, a clear answer to come back
    status, headers, body = ask(config, "GET", "/", door=door)
    assert status == 429 and headers["Retry-After"] == "1" and b"dclogin:" not in body


def test_pages_are_drawn_once_whatever_the_host(config, monkeypatch):
    from chatmaild.web import qr

    door = FrontDoor(config)
    drawn = []
    real = qr._command
    monkeypatch.setattr(qr, "_command", lambda texts: drawn.extend(texts) or real(texts))
    for i in range(40):
        host = f"127.0.0.{i}:{i}{'x' * i}" if i % 2 else f"127.0.0.{i}:{1000 + i}"
        for path in ("/", "/invite.svg"):
            assert ask(config, "GET", path, host, door=door)[0] == 200
    # one drawing, of the one address we have (the name's was drawn at start)
    assert drawn == ["DCACCOUNT:https://127.0.0.1:8443/new"]


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


def test_autoconfig_names_every_port_with_443_last(config):
    import xml.etree.ElementTree as ET

    status, headers, body = ask(config, "GET", "/.well-known/autoconfig/mail/config-v1.1.xml")
    assert status == 200 and headers["Content-Type"].startswith("application/xml")
    provider = ET.fromstring(body).find("emailProvider")
    assert provider is not None and provider.findtext("domain") == config.mail_domain

    def servers(tag):
        return [(s.findtext("hostname"), int(s.findtext("port") or 0), s.findtext("socketType"))
                for s in provider.findall(tag)]  # fmt: skip

    h, web = config.mail_domain, config.newemail_port
    imap = [(h, config.imaps_port, "SSL"), (h, config.imap_port, "STARTTLS"), (h, web, "SSL")]
    smtp = [(h, config.submissions_port, "SSL"), (h, config.submission_port, "STARTTLS"),
            (h, web, "SSL")]  # fmt: skip
    assert servers("incomingServer") == imap and servers("outgoingServer") == smtp
    assert all(s.findtext("username") == "%EMAILADDRESS%" for s in provider.iter()
               if s.tag.endswith("Server"))  # fmt: skip
