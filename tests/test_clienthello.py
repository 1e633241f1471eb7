"""Port 443's routing logic alone: ALPN from raw ClientHello bytes, the PROXY line."""

from __future__ import annotations

import ipaddress
import random
import ssl
import struct

import pytest

from chatmaild.web.clienthello import MAX_HELLO, offered_alpn
from chatmaild.web.limits import Admission, mail_budget
from chatmaild.web.tunnel import proxy_v1, proxy_v2


def client_hello(alpn: list[str] | None, sni: str = "chat.example") -> bytes:
    """The first flight of Python's (OpenSSL's) TLS client: a real ClientHello."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("alpn", [["imap"], ["smtp"], ["h2", "http/1.1"], ["x", "imap"], None])
def test_offered_alpn_of_real_client_hellos(alpn):
    hello = client_hello(alpn)
    assert offered_alpn(hello) == tuple(alpn or ())
    # what follows the hello does not matter; what is missing of it is waited for
    assert offered_alpn(hello + b"\x17\x03\x03") == tuple(alpn or ())
    for cut in (0, 1, 4, 5, 6, 9, len(hello) // 2, len(hello) - 1):
        assert offered_alpn(hello[:cut]) is None, cut


def test_hello_split_over_records():
    hello = client_hello(["imap"])
    body = hello[5:]
    records = b""
    for i in range(0, len(body), 100):  # legal: a handshake message over many records
        chunk = body[i : i + 100]
        records += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    assert offered_alpn(records) == ("imap",)
    assert offered_alpn(records[:-1]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the TLS port
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
        b"\x16\x03\x01\xff\xff",  # a record longer than any hello we read
    ],
)
def test_not_a_client_hello_offers_nothing(data):
    assert offered_alpn(data) == ()


def test_malformed_alpn_offers_nothing():
    hello = bytearray(client_hello(["imap"]))
    at = hello.find(b"\x04imap")
    hello[at] = 0x09  # a name longer than its list
    assert offered_alpn(bytes(hello)) == ()


def test_endless_hello_is_given_up():
    # record headers promising more, 16 KB at a time: no more than MAX_HELLO is read
    record = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff" + b"\x00" * (0x4000 - 4)
    data = record * (MAX_HELLO // len(record) + 2)
    assert offered_alpn(data) == ()


def test_random_bytes_never_raise():
    rng = random.Random(443)
    hello = client_hello(["imap", "smtp"])
    for _ in range(3000):
        data = bytearray(hello)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        result = offered_alpn(bytes(data[: rng.randint(0, len(data))]))
        assert result is None or isinstance(result, tuple)
        offered_alpn(bytes(rng.randbytes(rng.randint(0, 64))))


def test_proxy_line():
    assert proxy_v1(("192.0.2.7", 51000), ("198.51.100.1", 443)) == (
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n"
    )
    # an IPv4 client of a dual-stack socket is named as IPv4
    assert proxy_v1(("::ffff:192.0.2.7", 5), ("::ffff:198.51.100.1", 443)) == (
        b"PROXY TCP4 192.0.2.7 198.51.100.1 5 443\r\n"
    )
    assert proxy_v1(("2001:db8::7", 5), ("2001:db8::1", 443)) == (
        b"PROXY TCP6 2001:db8::7 2001:db8::1 5 443\r\n"
    )


def test_tunnels_have_their_own_budget():
    a = Admission(max_connections=1, max_per_source=1, max_tunnels=3, max_tunnels_per_source=2)
    assert a.connect("192.0.2.1") is None
    assert a.open_tunnel("192.0.2.1") is None
    a.disconnect("192.0.2.1")  # a tunnel leaves the pages' budget
    assert a.connect("192.0.2.1") is None
    assert a.open_tunnel("192.0.2.1") is None
    assert a.open_tunnel("192.0.2.1") == "too many mail connections"
    assert a.open_tunnel("192.0.2.2") is None
    assert a.open_tunnel("192.0.2.3") == "mail connection limit reached"
    a.close_tunnel("192.0.2.1")
    assert a.open_tunnel("192.0.2.3") is None


def test_proxy_v2_names_the_client_and_its_tls():
    """Port 993's header for Dovecot: addresses, ports, and an SSL entry with the
    client-used-TLS bit and the version (what Dovecot counts as secured)."""
    head = proxy_v2(("192.0.2.7", 40000), ("198.51.100.1", 993), "TLSv1.3")
    assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    assert head[12] == 0x21 and head[13] == 0x11  # v2 PROXY; TCP over IPv4
    (length,) = struct.unpack("!H", head[14:16])
    body = head[16:]
    assert len(body) == length
    assert body[:8] == bytes([192, 0, 2, 7, 198, 51, 100, 1])
    assert struct.unpack("!HH", body[8:12]) == (40000, 993)
    kind, size = struct.unpack("!BH", body[12:15])
    assert kind == 0x20 and size == len(body) - 15
    ssl_entry = body[15:]
    assert ssl_entry[0] & 0x01 and struct.unpack("!I", ssl_entry[1:5]) == (0,)
    assert ssl_entry[5:] == b"\x21\x00\x07TLSv1.3"
    v6 = proxy_v2(("2001:db8::7", 5), ("::ffff:127.0.0.1", 993), "TLSv1.2")
    assert v6[13] == 0x21  # TCP over IPv6: the server end given in the client's family
    assert v6[16:32] == ipaddress.ip_address("2001:db8::7").packed
    assert v6[32:48] == ipaddress.ip_address("::1").packed
    mapped = proxy_v2(("::ffff:192.0.2.9", 5), ("::ffff:127.0.0.1", 993), "TLSv1.3")
    assert mapped[13] == 0x11 and mapped[16:20] == bytes([192, 0, 2, 9])


def test_the_front_and_port_443_share_one_budget_of_mail_connections():
    shared = mail_budget(2, 2)
    front = Admission(tunnels=shared)
    web = Admission(tunnels=shared)
    assert front.open_tunnel("192.0.2.1") is None
    assert web.open_tunnel("192.0.2.2") is None
    assert front.open_tunnel("192.0.2.3") == "mail connection limit reached"
    web.close_tunnel("192.0.2.2")
    assert front.open_tunnel("192.0.2.3") is None


def test_roles_of_one_process_take_one_budget_and_other_processes_their_own(tmp_path):
    from chatmaild.web.main import PlainHttpDaemon
    from tests.fixtures.filtermail import make_config

    config = make_config(tmp_path, max_imap_connections=3)
    shared: dict[str, object] = {}  # what run_daemons gives the roles of one process
    front, web = PlainHttpDaemon(config), PlainHttpDaemon(config)
    front.shared = web.shared = shared
    budget = front.mail_connections()
    assert web.mail_connections() is budget
    assert budget.take("192.0.2.1") is None
    assert PlainHttpDaemon(config).mail_connections() is not budget  # another process
