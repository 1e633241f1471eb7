"""HTTPS delivery, receiving (issue 21, part 2): ``POST /mxdeliv`` on the web port.

A make-run relay takes mail another relay sends over HTTPS and runs port 25's
own checks on it (Postfix's ``postfix/mxdeliv`` service: relay restrictions,
limits, the incoming filter's DKIM and encryption checks), logged under the
sender's address.  Every hostile request gets its 4xx and delivers nothing.
"""

from __future__ import annotations

import http.client
import shutil
import socket
from pathlib import Path

import pytest

from chatmaild.relay import client_tls_context
from chatmaild.relay.dns import LoopbackDNS
from testing import mails
from testing.maildirs import stored_message
from tests.sandbox import world_readable_tempdir
from tests.test_filtermail_postfix import account, signed, wait_for_mail
from tests.test_web_http import NewEmail

pytestmark = [pytest.mark.relay, pytest.mark.timeout(300)]
COMPONENTS = ("postfix", "dovecot", "doveauth", "filtermail", "newemail")
SENDER = "remote@other.example"


@pytest.fixture(scope="module")
def relay(dkim_keys):
    from chatmaild.filtermail.dkim import txt_record
    from tests.fixtures.relay import RelayPool

    with LoopbackDNS() as dns:
        dns.set_txt("dkim._domainkey.other.example", txt_record(dkim_keys["other.example"][1]))
        pool = RelayPool()
        try:
            yield pool({"dns_resolver": dns.address, "max_message_size": 200_000}, COMPONENTS)
        finally:
            pool.close()


def data_form(msg: bytes) -> bytes:
    """A message as SMTP DATA carries it: CRLF lines, dot-stuffed, no final dot."""
    msg = msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    stuffed = msg.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def post(relay, body: bytes, fields: list[tuple[str, str]], method: str = "POST",
         source: str = "127.0.0.1") -> tuple[int, dict, str]:  # fmt: skip
    conn = http.client.HTTPSConnection(relay.host, int(relay.ports["newemail"]), timeout=60,
                                       context=client_tls_context(),
                                       source_address=(source, 0))  # fmt: skip
    try:
        conn.putrequest(method, "/mxdeliv", skip_host=True)
        conn.putheader("Host", relay.mail_domain)
        for name, value in fields:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.headers), resp.read().decode()
    finally:
        conn.close()


def inbox(relay, addr: str) -> list[bytes]:
    home = Path(relay.config.mailboxes_dir) / addr
    return [stored_message(p) for p in home.rglob("*") if p.is_file()
            and p.parent.name in ("new", "cur")]  # fmt: skip


def test_signed_encrypted_mail_is_delivered_with_the_senders_address(relay, dkim_keys):
    bob, _ = account(relay)
    msg = signed(mails.encrypted_message(SENDER, [bob], subject="over https"), dkim_keys)
    status, headers, text = post(relay, data_form(msg),
                                 [("X-MAIL-FROM", SENDER), ("X-MAIL-TO", bob)],
                                 source="127.0.0.9")  # fmt: skip
    assert (status, headers["X-Mxdeliv"]) == (200, "delivered"), text
    assert text.startswith("250 ")
    assert b"over https" in wait_for_mail(relay, bob, b"over https", timeout=30)
    log = (relay.log_dir / "postfix.log").read_text(errors="replace")
    assert "postfix/mxdeliv/smtpd" in log and "connect from unknown[127.0.0.9]" in log


def test_what_port_25_refuses_is_refused_for_good(relay, dkim_keys):
    bob, _ = account(relay)
    unsigned = mails.encrypted_message(SENDER, [bob], subject="unsigned")
    status, headers, text = post(relay, data_form(unsigned),
                                 [("X-MAIL-FROM", SENDER), ("X-MAIL-TO", bob)])  # fmt: skip
    assert (status, headers["X-Mxdeliv"]) == (422, "permanent")
    assert text.strip() == "554 5.7.1 No DKIM signature found"
    # a recipient elsewhere: no relaying for strangers, and nothing for bob either
    msg = signed(mails.encrypted_message(SENDER, [bob, "x@third.example"]), dkim_keys)
    status, _, text = post(relay, data_form(msg), [("X-MAIL-FROM", SENDER),
                           ("X-MAIL-TO", bob), ("X-MAIL-TO", "x@third.example")])  # fmt: skip
    assert status == 422 and text.startswith("554 5.7.1") and "Relay access denied" in text
    big = signed(mails.encrypted_message(SENDER, [bob], size=150_000), dkim_keys)
    status, headers, text = post(relay, data_form(big) * 2, [("X-MAIL-TO", bob)])
    assert (status, headers["X-Mxdeliv"]) == (413, "permanent")
    assert inbox(relay, bob) == []


@pytest.mark.parametrize(
    ("fields", "body", "status"),
    [
        ([("X-MAIL-FROM", SENDER)], None, 400),  # no recipient
        ([("X-MAIL-FROM", SENDER), ("X-MAIL-FROM", SENDER), ("X-MAIL-TO", "BOB")], None, 400),
        ([("X-MAIL-TO", "BOB>")], None, 400),
        ([("X-MAIL-TO", "BOB> NOTIFY=NEVER")], None, 400),
        ([("X-MAIL-FROM", "<x@other.example>"), ("X-MAIL-TO", "BOB")], None, 400),
        ([("X-MAIL-TO", "not an address")], None, 400),
        ([("X-MAIL-TO", "BOB")], b"Subject: x\nbare newlines\n", 400),
        ([("X-MAIL-TO", "BOB")], b"Subject: x\r\n\r\nstray\rCR\r\n", 400),
        # smuggling a second message after an end of DATA of its own
        ([("X-MAIL-TO", "BOB")], b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<a@b.c>\r\n", 400),
        ([("X-MAIL-TO", "BOB")], b"", 400),
        ([("X-MAIL-TO", "BOB")], b"x" * 3000 + b"\r\n", 400),  # a line over 2048
    ],
)
def test_hostile_requests_deliver_nothing(relay, fields, body, status):
    bob, _ = account(relay)
    fields = [(k, v.replace("BOB", bob)) for k, v in fields]
    data = b"Subject: fine\r\n\r\nfine\r\n" if body is None else body
    got, headers, text = post(relay, data, fields)
    assert (got, headers.get("X-Mxdeliv")) == (status, "permanent"), text
    assert inbox(relay, bob) == []


def test_other_methods_and_no_length(relay):
    status, headers, _ = post(relay, b"", [], method="GET")
    assert status == 405 and headers["Allow"] == "POST"
    raw = (f"POST /mxdeliv HTTP/1.1\r\nHost: x\r\nX-MAIL-TO: a@{relay.mail_domain}\r\n"
           "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode()  # fmt: skip
    sock = socket.create_connection((relay.host, int(relay.ports["newemail"])), timeout=30)
    with client_tls_context().wrap_socket(sock) as tls:
        tls.sendall(raw)
        answer = tls.recv(4096)
        assert answer.startswith(b"HTTP/1.1 411 ") and b"X-Mxdeliv: permanent\r\n" in answer


def test_slow_upload_gets_408(tmp_path):
    base = world_readable_tempdir("mxdeliv-")
    server = NewEmail(base, extra_args=["--upload-grace", "1"])
    try:
        with server.connect() as tls:
            tls.sendall(b"POST /mxdeliv HTTP/1.1\r\nHost: x\r\nX-MAIL-TO: a@chat.example\r\n"
                        b"Content-Length: 1000\r\n\r\nSubject: slow\r\n")  # fmt: skip
            answer = tls.recv(4096)  # the rest never comes
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"X-Mxdeliv: temporary\r\n" in answer and b"Retry-After: " in answer
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
