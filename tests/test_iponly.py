"""An IP-only relay (issue 20, part 6): ``mail_domain`` an IPv4 address.

Addresses are ``user@[a.b.c.d]``, Postfix names itself by the address's
reverse-pointer name (``myhostname`` must be a name), the certificate is
self-signed (no CA certifies a bare address here) and no ACME is tried.  The
real Delta Chat core onboards through the relay's dclogin link and exchanges
encrypted mail; two IP-only ``make run`` relays onboard it through their
home pages' links and exchange encrypted mail with each other.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from chatmaild.relay import client_tls_context
from testing.dcclient import securejoin, wait_incoming_text
from tests.fixtures.relay import full_relay
from tests.sandbox import world_readable_tempdir
from tests.test_relay_run import start_dev

pytestmark = [pytest.mark.relay, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def relay():
    with full_relay({"mail_domain": "127.0.0.1"}) as r:
        yield r


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


# ---------------------------------------------------------------- two IP-only relays


def home_page_link(host: str, port: int) -> str:
    """The ``dclogin:`` account the relay's home page offers: its code and its button."""
    ctx = client_tls_context()  # self-signed: what the link's ic=3 tells the app to accept
    with urllib.request.urlopen(f"https://{host}:{port}/", context=ctx, timeout=30) as resp:
        assert resp.headers["Cache-Control"] == "no-store"  # credentials of this visit
        page = resp.read().decode()
    hrefs = {html.unescape(h) for h in re.findall(r'href="(dclogin:[^"]+)"', page)}
    [link] = hrefs  # the code's link and the button's are one account
    assert f"<title>QR code: {html.escape(link)}</title>" in page  # the code holds it too
    return link


@pytest.fixture(scope="module")
def two_relays(tmp_path_factory):
    """Two `make run` relays, ``mail_domain`` 127.0.0.2 and 127.0.0.3, each peered
    with the other (like ``make run CONFIG=... PEERS=...``)."""
    base = world_readable_tempdir("iponly-")
    procs = []
    try:
        for n in (2, 3):
            ini = base / f"{n}.ini"
            ini.write_text(f"[params]\nmail_domain = 127.0.0.{n}\n")
            peers = ["--peer", str(base / "state2")] if n == 3 else []
            procs.append(start_dev(base / f"state{n}", "--config", str(ini), *peers)[0])
        facts = [json.loads((base / f"state{n}/relay.json").read_text()) for n in (2, 3)]
        deadline = time.monotonic() + 30
        while not json.loads((base / "state2/relay.json").read_text())["peers"]:
            assert time.monotonic() < deadline, "the first relay did not peer back"
            time.sleep(0.2)
        yield facts
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert "no process of this relay is left" in out, out
        shutil.rmtree(base, ignore_errors=True)


def test_two_ip_only_relays_onboard_from_the_home_page_and_exchange_mail(two_relays, clients):
    accounts = []
    for facts, name in zip(two_relays, ("alice", "bob"), strict=True):
        host = facts["host"]
        assert facts["mail_domain"] == f"[{host}]"
        link = home_page_link(host, facts["ports"]["newemail"])
        query = urllib.parse.parse_qs(link.partition("?")[2])
        assert query["ih"] == [host] and query["ic"] == ["3"]
        acc = clients.dc.add_account()
        acc.set_config("displayname", name)
        acc.add_transport_from_qr(link)
        acc.bring_online()
        assert acc.list_transports()[0]["addr"].endswith(f"@[{host}]")
        accounts.append(acc)
    alice, bob = accounts
    securejoin(alice, bob)
    alice.create_chat(bob).send_text("from one address to another")
    assert wait_incoming_text(bob, "from one address to another").show_padlock
    bob.create_chat(alice).send_text("and back across")
    assert wait_incoming_text(alice, "and back across").show_padlock
