"""Port 443 by ALPN (issue 21, part 1): ``imap`` reaches Dovecot, ``smtp`` Postfix's
implicit-TLS submission, anything else the web front door.

The web port of a make-run relay stands for 443.  The real Delta Chat core,
configured with that one port for IMAP and SMTP (it asks for ALPN ``imap`` and
``smtp`` on any port but 993 and 465), onboards, does a Secure-Join and
exchanges encrypted mail.  Dovecot and Postfix see the client's own address
(a PROXY line), and what is not a mail client's ClientHello is the web's.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time

import pytest

from chatmaild.relay import client_tls_context
from testing.dcclient import securejoin, wait_incoming_text
from tests.fixtures.relay import full_relay

pytestmark = [pytest.mark.relay, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def relay():
    with full_relay({"max_user_send_per_minute": 6000}) as r:
        yield r


def tls_to_443(relay, alpn: list[str], source: str = "127.0.0.1") -> ssl.SSLSocket:
    ctx = client_tls_context()
    ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection((relay.host, int(relay.ports["newemail"])), timeout=30,
                                   source_address=(source, 0))  # fmt: skip
    return ctx.wrap_socket(raw, server_hostname=relay.mail_domain)


def wait_for_line(path, pattern: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        found = [x for x in path.read_text(errors="replace").splitlines() if re.search(pattern, x)]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no line /{pattern}/ in {path}"
        time.sleep(0.1)


def login_line(relay, addr: str) -> str:
    """Dovecot's line of a login (2.3: ``Login:``, 2.4: ``Logged in:``)."""
    return wait_for_line(
        relay.log_dir / "dovecot.log", rf"(Login|Logged in): user=<{re.escape(addr)}>"
    )


def test_core_with_only_port_443_exchanges_encrypted_mail(relay, clients):
    alice = clients.account(relay, name="alice", port443=True)
    bob = clients.account(relay, name="bob", port443=True)
    port = int(relay.ports["newemail"])
    for acc in (alice, bob):
        [transport] = acc.list_transports()
        assert (transport["imapPort"], transport["smtpPort"]) == (port, port)
    securejoin(alice, bob)
    alice.create_chat(bob).send_text("through the web port")
    assert wait_incoming_text(bob, "through the web port").show_padlock
    bob.create_chat(alice).send_text("and back through it")
    assert wait_incoming_text(alice, "and back through it").show_padlock


def test_mail_servers_see_the_clients_address(relay):
    addr, password = relay.new_credentials()
    # a client from another loopback address than the web process's own 127.0.0.1
    with tls_to_443(relay, ["imap"], source="127.0.0.9") as tls:
        tls.recv(4096)  # the greeting
        tls.sendall(f'a LOGIN "{addr}" "{password}"\r\n'.encode())
        assert b"a OK" in tls.recv(4096)
    line = login_line(relay, addr)
    assert "rip=127.0.0.9" in line, line
    with tls_to_443(relay, ["smtp"], source="127.0.0.9") as tls:
        assert tls.recv(4096).startswith(b"220 ")
        tls.sendall(b"QUIT\r\n")
        tls.recv(4096)
    pattern = r"submissions-443/smtpd.*connect from .*\[127\.0\.0\.9\]"
    wait_for_line(relay.log_dir / "postfix.log", pattern)


def test_anything_else_is_the_web(relay):
    for alpn in (["http/1.1"], ["h2", "http/1.1"], []):
        with tls_to_443(relay, alpn) as tls:
            tls.sendall(b"GET /info.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 200"), alpn
    # the direct ports are unchanged
    with smtplib.SMTP_SSL(relay.host, int(relay.ports["submissions"]),
                          context=client_tls_context(), timeout=30) as smtp:  # fmt: skip
        assert smtp.noop()[0] == 250


def test_hostile_first_bytes_cost_nothing(relay):
    port = int(relay.ports["newemail"])
    for junk in (b"\x16\x03\x01\xff\xff" + b"\x00" * 100, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
                 b"a LOGIN x y\r\n", b"\x16\x03\x01\x00\x00"):  # fmt: skip
        with socket.create_connection((relay.host, port), timeout=30) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            # not a ClientHello: our own TLS refuses it and closes; nothing reached mail
            assert b"* OK" not in b"".join(iter(lambda: s.recv(4096), b""))
    # a PROXY line of the client's own is not believed: it reaches Dovecot inside TLS
    addr, password = relay.new_credentials()
    with tls_to_443(relay, ["imap"]) as tls:
        tls.recv(4096)
        tls.sendall(b"PROXY TCP4 203.0.113.5 127.0.0.1 1 2\r\n")
        tls.sendall(f'a LOGIN "{addr}" "{password}"\r\n'.encode())
        assert b"a OK" in tls.recv(4096) or b"a OK" in tls.recv(4096)
    line = login_line(relay, addr)
    assert "rip=127.0.0.1" in line and "203.0.113.5" not in line, line
    # and the web port still serves
    with tls_to_443(relay, ["http/1.1"]) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200")
