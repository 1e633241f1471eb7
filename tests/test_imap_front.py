"""Port 993's IMAP front (issue 27): the web process ends the clients' TLS and
passes each connection on to Dovecot's loopback ``imap_front`` listener, plaintext
after a PROXY v2 header naming the client and its TLS.

Dovecot must see the client's own address and count the connection as secured
(LOGIN allowed), imap-login must hold nothing of a logged-in client (the point of
the front: its TLS state was ~70 KB per idle device), and nothing a client sends
can pass for the header or reach Dovecot without TLS.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from chatmaild.relay import client_tls_context
from tests.fixtures.relay import full_relay

pytestmark = [pytest.mark.relay, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def relay():
    with full_relay() as r:
        yield r


def connect(relay, source: str = "127.0.0.1"):
    raw = socket.create_connection((relay.host, int(relay.ports["imaps"])), timeout=30,
                                   source_address=(source, 0))  # fmt: skip
    tls = client_tls_context().wrap_socket(raw, server_hostname=relay.mail_domain)
    f = tls.makefile("rb")
    assert f.readline().startswith(b"* OK ")
    return tls, f


def command(tls, f, tag: bytes, line: bytes) -> bytes:
    tls.sendall(tag + b" " + line + b"\r\n")
    while True:
        answer = f.readline()
        assert answer, "closed by the server"
        if answer.startswith(tag + b" "):
            return answer


def dovecot_lines(relay, pattern: str) -> list[str]:
    text = (relay.log_dir / "dovecot.log").read_text(errors="replace")
    return [x for x in text.splitlines() if re.search(pattern, x)]


def wait_for(check, what: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


def login_pattern(addr: str) -> str:
    return rf"(Login|Logged in): user=<{re.escape(addr)}>"  # 2.3, 2.4


def test_login_through_the_front_is_secured_and_names_the_client(relay):
    addr, password = relay.new_credentials()
    tls, f = connect(relay, source="127.0.0.9")
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert command(tls, f, b"a", f'LOGIN {addr} "{password}"'.encode()).startswith(b"a OK")
    assert command(tls, f, b"b", b"SELECT INBOX").startswith(b"b OK")
    line = wait_for(lambda: dovecot_lines(relay, login_pattern(addr)), "no login line")[-1]
    # secured by TLS: 2.3 says "secured" (as for a proxy's TLS), 2.4 "TLS"
    assert "rip=127.0.0.9" in line and re.search(r", (secured|TLS),", line)
    tls.close()


def imap_login_sockets(relay) -> int:
    """Sockets held by this relay's imap-login processes."""
    title = f"{relay.layout.dovecot_instance}/imap-login"
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(title.encode()):
                    continue
            fds = os.listdir(f"/proc/{pid}/fd")
            count += sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in fds)
        except OSError:
            continue
    return count


def test_imap_login_holds_nothing_of_logged_in_clients(relay):
    """With Dovecot's own TLS, imap-login keeps two sockets and the TLS state of every
    connection for its whole life; behind the front it hands each one on at login."""
    before = imap_login_sockets(relay)
    held = []
    try:
        for _ in range(20):
            addr, password = relay.new_credentials()
            tls, f = connect(relay)
            assert command(tls, f, b"a", f'LOGIN {addr} "{password}"'.encode()).startswith(b"a OK")
            assert command(tls, f, b"b", b"SELECT INBOX").startswith(b"b OK")
            held.append(tls)
        time.sleep(0.5)
        after = imap_login_sockets(relay)
        assert after - before < 5, (before, after)
        # and each still answers, through the front
        for i, tls in enumerate(held):
            assert command(tls, tls.makefile("rb"), b"c%d" % i, b"NOOP").startswith(b"c%d OK" % i)
    finally:
        for tls in held:
            tls.close()


def test_a_proxy_header_sent_by_the_client_is_not_believed(relay):
    """Our header goes first: what the client sends after the handshake is IMAP."""
    addr, password = relay.new_credentials()
    tls, f = connect(relay)
    answer = command(tls, f, b"PROXY", b"TCP4 192.0.2.66 127.0.0.1 1234 993")
    assert answer.startswith(b"PROXY BAD") or answer.startswith(b"PROXY NO")
    assert command(tls, f, b"a", f'LOGIN {addr} "{password}"'.encode()).startswith(b"a OK")
    line = wait_for(lambda: dovecot_lines(relay, login_pattern(addr)), "no login line")[-1]
    assert "192.0.2.66" not in line and "rip=127.0.0.1" in line
    tls.close()


def test_what_is_not_tls_reaches_no_dovecot(relay):
    """Plain IMAP, or a PROXY line, on port 993 gets no greeting: the front wants a
    ClientHello, and nothing reaches Dovecot's plaintext listener."""
    marker = "127.0.0.23"
    for first in (b"a LOGIN someone secret\r\n",
                  b"PROXY TCP4 192.0.2.67 127.0.0.1 1 993\r\na LOGIN x y\r\n"):  # fmt: skip
        with socket.create_connection((relay.host, int(relay.ports["imaps"])), timeout=15,
                                      source_address=(marker, 0)) as s:  # fmt: skip
            s.sendall(first)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
            assert b"OK" not in got and b"Dovecot" not in got
    time.sleep(0.3)
    assert not dovecot_lines(relay, rf"{marker}|192\.0\.2\.67")


def test_a_full_front_says_why_in_imap(tmp_path):
    """Past the mail connections' budget (max_imap_connections here) a client gets
    IMAP's own refusal with the limit's name, and the log names it too."""
    with full_relay({"max_imap_connections": 3}) as small:
        held = [connect(small) for _ in range(3)]
        try:
            raw = socket.create_connection((small.host, int(small.ports["imaps"])), timeout=30)
            tls = client_tls_context().wrap_socket(raw, server_hostname=small.mail_domain)
            greeting = tls.makefile("rb").readline()
            assert greeting == b"* BYE [UNAVAILABLE] mail connection limit reached\r\n"
            tls.close()
            log = small.log_dir / "newemail.log"
            wait_for(lambda: "chatmail-imaps" in log.read_text()
                     and "mail connection limit reached" in log.read_text(),
                     "the refusal is not logged")  # fmt: skip
        finally:
            for tls, _ in held:
                tls.close()
