"""SMTP smuggling against Postfix itself (issue 14, item 3).

The relay here runs without filtermail, so these tests show what Postfix's
own smtpd does with a non-standard end of data: every smtpd of the templates
(port 25, both submission ports, both re-injection services) must refuse a
message with a bare LF rather than end DATA at ``<LF>.<LF>`` and run the
commands hidden after it.
"""

from __future__ import annotations

import base64
import socket
import ssl

import pytest

from chatmaild.relay.stack import Relay, client_tls_context

pytestmark = [pytest.mark.postfix, pytest.mark.timeout(120)]

SMUGGLE = [b"\n.\n", b"\n.\r\n", b"\r\n.\n"]
SERVICES = ["smtp", "submission", "submissions", "reinject", "reinject_incoming"]


class Dialogue:
    """A raw SMTP client: bytes out exactly as given, replies read as they come."""

    def __init__(self, relay: Relay, service: str) -> None:
        where = relay.ports[service]
        if isinstance(where, str):  # the re-injection smtpds listen on UNIX sockets
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(where)
        else:
            sock = socket.create_connection(("127.0.0.1", int(where)), timeout=30)
        if service == "submissions":
            sock = client_tls_context().wrap_socket(sock)
        self.sock = sock
        self.file = sock.makefile("rb")
        assert self.reply().startswith("220")
        assert self.command("EHLO client.example").startswith("250")
        if service in ("smtp", "submission"):
            assert self.command("STARTTLS").startswith("220")
            self.sock = client_tls_context().wrap_socket(sock)
            self.file = self.sock.makefile("rb")
            assert self.command("EHLO client.example").startswith("250")

    def reply(self) -> str:
        """One (possibly multi-line) reply; '' when the server closed the connection."""
        lines = []
        while True:
            try:
                line = self.file.readline()
            except (ConnectionError, ssl.SSLError):
                line = b""
            if not line:
                return "\n".join(lines)
            lines.append(line.decode(errors="replace").rstrip("\r\n"))
            if len(lines[-1]) < 4 or lines[-1][3] != "-":
                return "\n".join(lines)

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def login(self, addr: str, password: str) -> None:
        token = base64.b64encode(f"\0{addr}\0{password}".encode()).decode()
        assert self.command(f"AUTH PLAIN {token}").startswith("235")

    def replies_until_closed(self) -> list[str]:
        replies = []
        while reply := self.reply():
            replies.append(reply)
        return replies

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def user(relay: Relay) -> tuple[str, str]:
    addr, password = relay.new_credentials()
    relay.imap(addr, password).logout()
    return addr, password


def session(relay: Relay, user: tuple[str, str], service: str) -> tuple[Dialogue, str, str]:
    """A dialogue ready for MAIL FROM (logged in on submission), the recipient and sender."""
    addr, password = user
    sender = addr if service.startswith("submission") else "someone@other.example"
    d = Dialogue(relay, service)
    if service.startswith("submission"):
        try:
            d.login(addr, password)
        except BaseException:
            d.close()
            raise
    return d, addr, sender


@pytest.mark.parametrize("ending", SMUGGLE, ids=["LF.LF", "LF.CRLF", "CRLF.LF"])
@pytest.mark.parametrize("service", SERVICES)
def test_postfix_does_not_end_data_at_a_bare_lf(relay, user, service, ending):
    d, addr, sender = session(relay, user, service)
    try:
        assert d.command(f"MAIL FROM:<{sender}>").startswith("250")
        assert d.command(f"RCPT TO:<{addr}>").startswith("250")
        assert d.command("DATA").startswith("354")
        smuggled = (
            f"MAIL FROM:<{sender}>\r\nRCPT TO:<{addr}>\r\nDATA\r\n"
            "From: <ceo@bank.example>\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
        ).encode()
        d.sock.sendall(
            f"From: <{sender}>\r\nSubject: first\r\n\r\nfirst".encode()
            + ending
            + smuggled
            + b"QUIT\r\n"
        )
        replies = d.replies_until_closed()
    finally:
        d.close()
    # the smuggled DATA never got its go-ahead, and the message was refused
    assert not any(r.startswith("354") for r in replies), replies
    assert replies and replies[0].startswith("550 5.5.2"), replies
    assert "bare <LF>" in replies[0], replies


@pytest.mark.parametrize("service", SERVICES)
def test_postfix_refuses_content_sent_before_354(relay, user, service):
    """RFC 2920: DATA ends a pipelined group; content before the 354 is a
    protocol violation that smuggling relies on, and costs the connection."""
    d, addr, sender = session(relay, user, service)
    try:
        d.sock.sendall(
            f"MAIL FROM:<{sender}>\r\nRCPT TO:<{addr}>\r\nDATA\r\n"
            f"From: <{sender}>\r\n\r\nearly\r\n.\r\nQUIT\r\n".encode()
        )
        replies = d.replies_until_closed()
    finally:
        d.close()
    assert not any(r.startswith("354") for r in replies), replies
    assert any(r.startswith("554 5.5.0") and "synchronization" in r for r in replies), replies
