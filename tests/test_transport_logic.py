"""filtermail transport's decisions (chatmaild.filtermail.delivery), without servers,
and its MX lookups against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import re

import pytest

from chatmaild.common.config import parse_params
from chatmaild.filtermail.delivery import (
    Kind,
    TLSPolicy,
    clean_text,
    literal_host,
    mx_hosts,
    mxdeliv_outcome,
    reply_class,
    smtp_reply,
    tls_policy,
)
from chatmaild.filtermail.transport import Host, Routes, TransportHandler, is_public
from chatmaild.relay.dns import LoopbackDNS
from chatmaild.relay.render import SOURCE_ROOT


def test_our_answers_are_read_by_their_marker():
    ok = mxdeliv_outcome("mx.b", 200, "delivered", b"250 2.0.0 Ok: queued")
    assert ok.kind is Kind.DELIVERED and ok.reply == "250 2.0.0 delivered over HTTPS to mx.b"
    refused = mxdeliv_outcome("mx.b", 422, "permanent", b"554 5.7.1 <x@b>: Recipient refused")
    assert refused.kind is Kind.PERMANENT
    assert refused.reply == "554 5.7.1 mx.b said: <x@b>: Recipient refused"
    # a permanent answer without an SMTP reply in its body still bounces
    bad = mxdeliv_outcome("mx.b", 400, "permanent", b"X-MAIL-TO is not an address")
    assert bad.reply.startswith("554 5.0.0 mx.b answered 400") and bad.kind is Kind.PERMANENT
    big = mxdeliv_outcome("mx.b", 413, "permanent", b"larger than 100 bytes")
    assert big.reply == "552 5.3.4 mx.b answered 413 to /mxdeliv: larger than 100 bytes"
    busy = mxdeliv_outcome("mx.b", 429, "temporary", b"too many uploads")
    assert busy.kind is Kind.TEMPORARY and busy.reply.startswith("451 4.0.0 mx.b answered 429")
    down = mxdeliv_outcome("mx.b", 503, "temporary", b"421 4.3.2 Service shutting down")
    assert down.kind is Kind.TEMPORARY and down.reply.startswith("421 4.3.2 mx.b said:")
    # a 5xx body under a "temporary" marker does not turn into a bounce
    odd = mxdeliv_outcome("mx.b", 503, "temporary", b"550 5.1.1 no")
    assert odd.kind is Kind.TEMPORARY and odd.reply.startswith("451 ")


def test_reference_relays_answers_without_marker():
    assert mxdeliv_outcome("mx.r", 200, "", b"250 OK").kind is Kind.DELIVERED
    perm = mxdeliv_outcome("mx.r", 400, "", b"523 Encryption Needed: Invalid Unencrypted Mail")
    assert perm.kind is Kind.PERMANENT and perm.reply.startswith("523 5.0.0 mx.r said:")
    temp = mxdeliv_outcome("mx.r", 400, "", b"451 4.7.1 DKIM lookup failed")
    assert temp.kind is Kind.TEMPORARY and temp.reply.startswith("451 4.7.1")
    big = mxdeliv_outcome("mx.r", 413, "", b"552 Message exceeds maximum size")
    assert big.kind is Kind.PERMANENT and big.reply.startswith("552 5.3.4")


@pytest.mark.parametrize("status", [404, 405, 301, 403, 400])
def test_a_web_server_without_the_route_means_smtp(status):
    # 400 with a body that is no SMTP reply: some other server's error page
    outcome = mxdeliv_outcome("www.c", status, "", b"<html>Not Found</html>")
    assert outcome.kind is Kind.NO_ROUTE


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_failing_web_server_is_tried_again_or_bypassed(status):
    assert mxdeliv_outcome("www.c", status, "", b"Bad Gateway").kind is Kind.FAILED


def test_peer_text_cannot_break_the_reply_line():
    text = clean_text(b"554 evil\r\n250 2.0.0 fake\x00\xff" + b"x" * 1000)
    assert "\r" not in text and "\n" not in text and len(text) <= 300
    reply = mxdeliv_outcome("mx.b", 422, "permanent", b"554 5.7.1 a\r\n250 ok")
    assert "\r" not in reply.reply and "\n" not in reply.reply


def test_smtp_replies_keep_the_peers_code():
    assert smtp_reply("mx.b", 250, b"2.0.0 Ok: queued as X").startswith(
        "250 2.0.0 delivered over SMTP to mx.b: 250"
    )
    assert smtp_reply("mx.b", 550, b"5.1.1 <x@b>: unknown") == "550 5.1.1 mx.b said: <x@b>: unknown"
    assert smtp_reply("mx.b", 452, b"too many") == "452 4.0.0 mx.b said: too many"
    assert reply_class("250 x") == "sent" and reply_class("451 x") == "deferred"
    assert reply_class("554 x") == "bounced"


def _postfix_policy(domain: str) -> str:
    """What postfix/tls_policy (smtp_tls_policy_maps) says for ``domain``."""
    for line in (SOURCE_ROOT / "postfix/tls_policy").read_text().splitlines():
        if line.startswith("/"):
            pattern, action = line.rsplit(None, 1)
            if re.search(pattern.strip()[1:-1], domain):
                return action
    return "verify"  # smtp_tls_security_level


@pytest.mark.parametrize(
    "domain", ["chat.example.org", "[127.0.0.1]", "[IPv6:::1]", "_test.relay", "nauta.cu", "a.cu"]
)
def test_https_and_smtp_have_postfixs_port_25_policy(domain):
    assert tls_policy(domain).value == _postfix_policy(domain)


def test_address_literals():
    assert literal_host("[10.0.0.1]") == "10.0.0.1"
    assert literal_host("[IPv6:2001:db8::1]") == "2001:db8::1"
    assert literal_host("[not an ip]") is None and literal_host("example.org") is None


def test_mx_rules():
    assert mx_hosts("b.org", [(20, "mx2.b.org."), (10, "mx1.b.org.")], False).hosts == (
        "mx1.b.org",
        "mx2.b.org",
    )
    assert mx_hosts("b.org", None, False).hosts == ("b.org",)  # implicit MX
    assert mx_hosts("b.org", [(0, ".")], False).error.startswith("556 5.1.10")
    assert mx_hosts("b.org", None, True).error.startswith("550 5.1.2")


def handled(handler: TransportHandler, method: str, *args):
    """``handler.method(*args)`` run to its end, the handler closed after."""

    async def run():
        try:
            return await getattr(handler, method)(*args)
        finally:
            await handler.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def dns_server():
    with LoopbackDNS() as server:
        server.set_mx("two.test", (20, "mx2.two.test"), (10, "mx1.two.test"))
        server.set_mx("nullmx.test", (0, "."))
        server.set_a("nomx.test", "127.0.0.9")
        server.set_txt("other.test", "v=spf1 -all")
        server.fail("broken.test", "servfail")
        yield server


def test_mx_lookups_through_a_dns_server(dns_server, tmp_path):
    config = parse_params({"mail_domain": "chat.example", "dns_resolver": dns_server.address})

    def hosts(domain):
        return handled(TransportHandler(config), "_hosts", domain)

    assert hosts("two.test") == (
        [Host("mx1.two.test", "mx1.two.test"), Host("mx2.two.test", "mx2.two.test")],
        None,
    )
    assert hosts("nomx.test") == ([Host("nomx.test", "nomx.test")], None)
    assert hosts("nullmx.test")[1].startswith("556 5.1.10")
    assert hosts("nowhere.test")[1].startswith("550 5.1.2")
    assert hosts("broken.test")[1].startswith("451 4.4.3")
    assert hosts("[127.0.0.5]") == ([Host("127.0.0.5", "127.0.0.5")], None)


def test_routes_are_the_only_destinations_of_a_local_relay(tmp_path):
    path = tmp_path / "routes"
    routes = Routes(path)
    assert routes.lookup("b.test") is None  # no file yet
    path.write_text("# comment\nb.test 127.0.0.1 2525 8443\n")
    assert routes.lookup("b.test") == Host("b.test", "127.0.0.1", 8443, 2525)
    path.write_text("c.test 127.0.0.3 25 443\n")
    assert routes.lookup("b.test") is None and routes.lookup("c.test").connect == "127.0.0.3"
    config = parse_params({"mail_domain": "chat.example"})

    outside = handled(TransportHandler(config, routes), "_hosts", "gmail.com")
    assert outside[1].startswith("550 5.7.1 delivery outside")
    assert TLSPolicy.ENCRYPT.value == "encrypt"


@pytest.mark.parametrize(
    "address, public",
    [("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("100.64.0.1", False),
     ("169.254.169.254", False), ("::1", False), ("fe80::1%eth0", False), ("0.0.0.0", False),
     ("224.0.0.1", False), ("1.1.1.1", True), ("2606:4700::1111", True)],
)  # fmt: skip
def test_only_public_addresses_are_delivered_to(address, public):
    assert is_public(address) is public


def test_mx_pointing_at_the_machine_itself_is_skipped():
    config = parse_params({"mail_domain": "chat.example"})

    problems: list[str] = []
    found = handled(
        TransportHandler(config), "_public",
        [Host("localhost", "localhost"), Host("mx.b", "10.0.0.1"), Host("x", "1.1.1.1")],
        problems,
    )  # fmt: skip
    assert found == [Host("x", "1.1.1.1")]
    assert problems[0].startswith("localhost: not a public address (")
    assert "127.0.0.1" in problems[0]  # and ::1 where /etc/hosts names both


def test_an_ip_only_peer_is_named_by_its_bare_address(tmp_path):
    path = tmp_path / "routes"
    path.write_text("[127.0.0.3] 127.0.0.3 2525 8443\n")
    assert Routes(path).lookup("[127.0.0.3]") == Host("127.0.0.3", "127.0.0.3", 8443, 2525)
