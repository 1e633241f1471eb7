"""SMTP protocol edge cases of filtermail's server, driven over raw sockets."""

from __future__ import annotations

import asyncio
import time

import pytest

from chatmaild.filtermail.smtp import (
    ServerSettings,
    SMTPServer,
    dot_stuff,
    dot_unstuff,
    has_bare_cr_or_lf,
    parse_path,
)
from tests.fixtures.filtermail import RecordingHandler, SMTPClient, start_smtp


@pytest.fixture
def smtp_factory(loop_thread):
    servers = []

    def factory(**kw):
        handler = RecordingHandler()
        settings = ServerSettings("filter.example", kw.pop("max_size", 10000), **kw)
        srv, port = loop_thread.run(start_smtp(SMTPServer(handler, settings)))
        servers.append(srv)
        return handler, port

    yield factory
    for srv in servers:
        loop_thread.loop.call_soon_threadsafe(srv.close)


@pytest.fixture
def smtp(smtp_factory):
    return smtp_factory()


def test_every_command_answered(smtp):
    handler, port = smtp
    c = SMTPClient(port)
    assert c.greeting.startswith("220 filter.example")
    ehlo = c.cmd("EHLO client.example")
    assert ehlo.startswith("250-filter.example")
    assert "PIPELINING" in ehlo and "8BITMIME" in ehlo and "SIZE 10000" in ehlo
    assert c.cmd("HELO client.example").startswith("250 ")
    assert c.cmd("HELO").startswith("501")
    assert c.cmd("NOOP").startswith("250")
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("VRFY x").startswith("252")
    assert c.cmd("HELP").startswith("214")
    assert c.cmd("EXPN list").startswith("502")
    assert c.cmd("STARTTLS").startswith("502")
    assert c.cmd("BOGUS").startswith("500")
    assert c.cmd("").startswith("500")
    assert c.cmd("RCPT TO:<a@b.example>").startswith("503")
    assert c.cmd("DATA").startswith("503")
    assert c.cmd("MAIL FROM:a@b.example").startswith("501")
    assert c.cmd("MAIL TO:<a@b.example>").startswith("501")
    assert c.cmd("MAIL FROM:<a@b.example> BODY=8BITMIME SMTPUTF8").startswith("250")
    assert c.cmd("MAIL FROM:<c@b.example>").startswith("503")
    assert c.cmd("DATA").startswith("554")
    assert c.cmd("RCPT TO:<no-domain>").startswith("553")
    assert c.cmd("RCPT TO:<>").startswith("501")
    assert c.cmd("RCPT TO:<x@y.example").startswith("501")
    assert c.cmd("QUIT").startswith("221")
    assert c.reply() == ""  # closed
    assert handler.messages == []


def test_rcpt_esmtp_params_accepted_and_kept(smtp):
    handler, port = smtp
    c = SMTPClient(port)
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@b.example> RET=HDRS ENVID=abc XFOO=1").startswith("250")
    r = c.cmd("RCPT TO:<r@b.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r@b.example")
    assert r.startswith("250")
    assert c.cmd("RCPT TO:<s@b.example> NOTIFY=NEVER").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert c.reply().startswith("250")
    (m,) = handler.messages
    assert m.rcpt_tos == ["r@b.example", "s@b.example"]
    assert m.rcpt_params == [
        ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;r@b.example"],
        ["NOTIFY=NEVER"],
    ]
    assert m.mail_params == ["RET=HDRS", "ENVID=abc"]  # unknown params are not passed on


def test_dot_stuffing_removed_before_handler(smtp):
    handler, port = smtp
    c = SMTPClient(port)
    c.cmd("EHLO x")
    content = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
    assert c.transaction("a@b.example", ["r@b.example"], content).startswith("250")
    assert handler.messages[0].content == content
    assert dot_stuff(content) == content.replace(b"\r\n.", b"\r\n..")


def test_empty_message_and_leading_dot(smtp):
    handler, port = smtp
    c = SMTPClient(port)
    c.cmd("EHLO x")
    assert c.transaction("a@b.example", ["r@b.example"], b"").startswith("250")
    assert c.transaction("a@b.example", ["r@b.example"], b".x\r\n").startswith("250")
    assert [m.content for m in handler.messages] == [b"", b".x\r\n"]


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\n",  # bare LF lone dot
        b"\r\n.\n",  # CRLF dot LF
        b"\n.\r\n",  # LF dot CRLF
        b"\r.\r",  # bare CR
        b"\r\n.\r",
    ],
)
def test_no_smuggling_with_bare_line_ends(smtp, smuggle):
    """A non-CRLF 'end of data' is data; the message is refused as a whole and the
    commands hidden behind it are never executed."""
    handler, port = smtp
    c = SMTPClient(port)
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@b.example>").startswith("250")
    assert c.cmd("RCPT TO:<r@b.example>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(
        b"Subject: x\r\n\r\nhi"
        + smuggle
        + b"MAIL FROM:<evil@b.example>\r\nRCPT TO:<victim@b.example>\r\nDATA\r\nforged\r\n"
        + b".\r\n"
    )
    assert c.reply().startswith("500 5.6.0")
    assert c.cmd("NOOP").startswith("250")  # exactly one reply came for all of that
    assert handler.messages == []


def test_oversize_read_to_end_then_552(smtp_factory):
    handler, port = smtp_factory(max_size=1000)
    c = SMTPClient(port)
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=2000").startswith("552")
    assert c.cmd("MAIL FROM:<a@b.example>").startswith("250")
    assert c.cmd("RCPT TO:<r@b.example>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    lines = b"".join(b"RSET\r\nMAIL FROM:<x@y.example>\r\nQUIT\r\n" for _ in range(500))
    c.send(b"Subject: big\r\n\r\n" + lines + b".\r\n")
    assert c.reply().startswith("552 5.3.4")
    assert c.cmd("NOOP").startswith("250")
    # the connection is still usable for a normal message
    assert c.transaction("a@b.example", ["r@b.example"], b"Subject: s\r\n\r\nok\r\n")[:3] == "250"
    assert [m.content for m in handler.messages] == [b"Subject: s\r\n\r\nok\r\n"]


def test_pipelined_commands_and_data_in_one_write(smtp):
    handler, port = smtp
    c = SMTPClient(port)
    c.send(
        b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<r@b.example>\r\nDATA\r\n"
        b"Subject: p\r\n\r\none\r\n.\r\nMAIL FROM:<b@b.example>\r\nRCPT TO:<s@b.example>\r\n"
        b"DATA\r\nSubject: q\r\n\r\ntwo\r\n.\r\nQUIT\r\n"
    )
    codes = [c.reply()[:3] for _ in range(10)]
    assert codes == ["250", "250", "250", "354", "250", "250", "250", "354", "250", "221"]
    assert [m.mail_from for m in handler.messages] == ["a@b.example", "b@b.example"]


def test_bare_lf_or_cr_in_command_closes(smtp):
    handler, port = smtp
    c = SMTPClient(port)
    c.send(b"NOOP\n")
    assert c.reply().startswith("500")
    assert c.reply() == ""
    c = SMTPClient(port)
    c.send(b"NO\rOP\r\n")
    assert c.reply().startswith("500")
    assert c.reply() == ""


def test_long_line_refused(smtp):
    _, port = smtp
    c = SMTPClient(port)
    c.send(b"NOOP " + b"x" * 100_000 + b"\r\n")
    assert c.reply().startswith("500 5.5.2")
    assert c.cmd("NOOP").startswith("250")


def test_invalid_utf8_command(smtp):
    _, port = smtp
    c = SMTPClient(port)
    c.send(b"MAIL FROM:<\xff@b.example>\r\n")
    assert c.reply().startswith("500")
    assert c.cmd("NOOP").startswith("250")


def test_eof_during_data_delivers_nothing(smtp):
    handler, port = smtp
    c = SMTPClient(port)
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@b.example>")
    c.cmd("RCPT TO:<r@b.example>")
    c.cmd("DATA")
    c.send(b"Subject: x\r\n\r\nunterminated")
    c.sock.shutdown(1)
    assert c.reply() == ""
    assert handler.messages == []


def test_idle_timeout(smtp_factory):
    _, port = smtp_factory(idle_timeout=0.3)
    c = SMTPClient(port)
    assert c.reply().startswith("421 4.4.2")
    assert c.reply() == ""


def test_total_timeout_during_data(smtp_factory):
    _, port = smtp_factory(total_timeout=0.5)
    c = SMTPClient(port)
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@b.example>")
    c.cmd("RCPT TO:<r@b.example>")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: slow\r\n")
    assert c.reply().startswith("421")


def test_idle_timeout_counts_only_silence_of_the_client(smtp_factory):
    handler, port = smtp_factory(idle_timeout=1.0)
    c = SMTPClient(port)
    c.cmd("EHLO x")
    for _ in range(8):  # busy for 1.6 s, never silent for 1 s
        time.sleep(0.2)
        assert c.cmd("NOOP").startswith("250")

    async def slow(*a):  # the filter's own work does not count as client silence
        await asyncio.sleep(1.5)
        return "250 slow but fine"

    handler.handle_data = slow
    assert c.transaction("a@b.example", ["r@b.example"], b"S: x\r\n\r\nx\r\n") == (
        "250 slow but fine"
    )
    assert c.reply().startswith("421 4.4.2")  # and then silence is cut again


def test_handler_crash_is_451(smtp_factory, loop_thread):
    handler, port = smtp_factory()

    async def boom(*a):
        raise RuntimeError("bug")

    handler.handle_data = boom
    c = SMTPClient(port)
    c.cmd("EHLO x")
    assert c.transaction("a@b.example", ["r@b.example"], b"S: x\r\n\r\nx\r\n").startswith("451")
    assert c.cmd("NOOP").startswith("250")


def test_helpers():
    assert parse_path("<a@b> SIZE=1") == ("a@b", " SIZE=1")
    assert parse_path('<"x>y"@b>') == ('"x>y"@b', "")
    assert parse_path("<@relay:a@b>") == ("a@b", "")
    assert parse_path("a@b") is None
    assert has_bare_cr_or_lf(b"a\nb")
    assert has_bare_cr_or_lf(b"a\rb\r\n")
    assert not has_bare_cr_or_lf(b"a\r\nb\r\n")
    assert dot_unstuff(bytearray(b"..a\r\n..b\r\n.c\r\n")) == b".a\r\n.b\r\nc\r\n"
    for text in (b".a\r\n.b\r\n", b"x\r\n..\r\n", b"plain\r\n"):
        assert dot_unstuff(bytearray(dot_stuff(text))) == text
    assert dot_stuff(memoryview(b"abc\r\n")) == b"abc\r\n"
