"""An IP-only relay (issue 20, part 6): ``mail_domain`` an IPv4 address.

Addresses are ``user@[a.b.c.d]``, Postfix names itself by the address's
reverse-pointer name (``myhostname`` must be a name), the certificate is
self-signed (no CA certifies a bare address here) and no ACME is tried.  The
real Delta Chat core onboards through the relay's dclogin link and exchanges
encrypted mail.
"""

from __future__ import annotations

import subprocess

import pytest

from testing.dcclient import DCClients, securejoin, wait_incoming_text

pytestmark = [pytest.mark.relay, pytest.mark.timeout(300)]
FULL = ("postfix", "dovecot", "doveauth", "lastlogin", "metadata", "filtermail", "newemail")


@pytest.fixture(scope="module")
def relay():
    from tests.fixtures.relay import RelayPool

    pool = RelayPool()
    try:
        yield pool({"mail_domain": "127.0.0.1"}, FULL)
    finally:
        pool.close()


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    c = DCClients(tmp_path_factory.mktemp("dc"))
    yield c
    c.close()


def test_postfix_names_itself_by_the_reverse_pointer(relay):
    assert relay.config.mail_domain == "[127.0.0.1]"
    conf = str(relay.layout.postfix_config_dir)
    out = subprocess.run(["postconf", "-c", conf, "-h", "myhostname", "mydestination"],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert out == ["1.0.0.127.in-addr.arpa", "[127.0.0.1]"]


def test_no_certificate_from_a_ca(relay):
    # even with a CA configured: no name to certify, the self-signed certificate stays
    ini = relay.ini_path.read_text()
    lines = [x for x in ini.splitlines() if not x.startswith("acme_directory")]
    relay.ini_path.write_text("\n".join([*lines, "acme_directory = https://127.0.0.1:9/dir\n"]))
    try:
        res = subprocess.run(relay.acme_command(), capture_output=True, text=True, timeout=60)
    finally:
        relay.ini_path.write_text(ini)
    assert res.returncode == 0 and "an IP-only relay" in res.stderr, res.stderr


def test_core_onboards_and_exchanges_encrypted_mail(relay, clients):
    alice = clients.account(relay, name="alice")
    bob = clients.account(relay, name="bob")
    assert alice.list_transports()[0]["addr"].endswith("@[127.0.0.1]")
    securejoin(alice, bob)
    alice.create_chat(bob).send_text("hello over an address")
    assert wait_incoming_text(bob, "hello over an address").show_padlock
    bob.create_chat(alice).send_text("and back")
    assert wait_incoming_text(alice, "and back").show_padlock
