"""Dovecot dict protocol server: framing, escaping and every command, on a real socket."""

from __future__ import annotations

import pytest

from chatmaild.dictd.proxy import (
    ITER_NO_VALUE,
    MAX_LINE,
    ProtocolError,
    split_fields,
    tabescape,
    tabunescape,
)
from testing.rawdict import RawDictClient

# ---------------------------------------------------------------- escaping (pure)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain",
        "tab\there",
        "new\nline\r\n",
        "nul\0byte",
        "escape\x01char",
        "\x01\x01t\t\x010",
        "ünïcödé ✉",
        "\\backslash\"quote'",
    ],
)
def test_tabescape_roundtrip(text):
    escaped = tabescape(text)
    assert not any(c in escaped for c in "\t\n\r\0")
    assert tabunescape(escaped) == text


def test_tabescape_exact_encoding():
    assert tabescape("a\tb") == "a\x01tb"
    assert tabescape("\x01") == "\x011"
    assert tabescape("\0\n\r") == "\x010\x01n\x01r"


@pytest.mark.parametrize("broken", ["\x01", "abc\x01", "\x01x", "\x01T"])
def test_tabunescape_rejects_broken_escape(broken):
    with pytest.raises(ProtocolError):
        tabunescape(broken)


def test_split_fields_unescapes_each_field():
    assert split_fields("a\x01tb\tc\x011\t") == ["a\tb", "c\x01", ""]


# ---------------------------------------------------------------- lookups


def set_value(client: RawDictClient, key: str, value: str, txid: str = "1") -> None:
    client.send(f"B{txid}\t", f"S{txid}\t{tabescape(key)}\t{tabescape(value)}")
    assert client.request(f"C{txid}") == f"O{txid}"


def test_hello_has_no_reply(memdict_client):
    memdict_client.send("H3\t2\t0\tsomeone\tmeta")
    assert memdict_client.silent()


def test_lookup_found_and_not_found(memdict_client):
    assert memdict_client.lookup("shared/nothing") == "N"
    set_value(memdict_client, "shared/k", "value")
    assert memdict_client.lookup("shared/k") == "Ovalue"


def test_lookup_value_with_special_characters_is_escaped(memdict_client):
    value = "line1\nline2\ttab\x01\0end"
    set_value(memdict_client, "shared/weird\tkey", value)
    reply = memdict_client.lookup("shared/weird\tkey")
    assert reply == "O" + tabescape(value)
    assert tabunescape(reply[1:]) == value


def test_lookup_multiple_values(memdict_client):
    set_value(memdict_client, "shared/list/x", "a,b\tc")
    reply = memdict_client.lookup("shared/list/x")
    assert split_fields(reply[1:]) == ["a", "b\tc"]


def test_lookup_user_from_request_or_hello(memdict):
    sock, _ = memdict
    with RawDictClient(sock, hello=False) as client:
        client.send("H3\t2\t0\thello-user@example.org\tmeta")
        assert client.lookup("shared/user") == "Ohello-user@example.org"
        assert client.lookup("shared/user", user="other@example.org") == "Oother@example.org"


@pytest.mark.parametrize(
    "line",
    [
        "L",  # no key
        "L\tuser",  # empty key
        "Lshared/\x01x",  # broken escape
        "Lshared/fail/boom",  # handler raises
        "I",  # iterate without fields
        "Ix\t0\tshared/",  # non-numeric flags
        "I0\ty\tshared/",  # non-numeric max_rows
        "Xwhat",  # unknown command
    ],
)
def test_malformed_or_failing_request_answers_f_and_keeps_serving(memdict_client, line):
    assert memdict_client.request(line) == "F"
    # the same connection keeps working
    assert memdict_client.lookup("shared/none") == "N"


def test_handler_exception_does_not_stop_daemon(memdict):
    sock, daemon = memdict
    with RawDictClient(sock) as c1:
        assert c1.lookup("shared/fail/x") == "F"
    with RawDictClient(sock) as c2:
        assert c2.lookup("shared/none") == "N"
    assert daemon.proc.poll() is None
    assert "lookup failure requested by the test" in daemon.log()


def test_empty_lines_and_crlf_are_tolerated(memdict_client):
    memdict_client.send("", "")
    set_value(memdict_client, "shared/crlf", "v")
    assert memdict_client.request("Lshared/crlf\t\r") == "Ov"


# ---------------------------------------------------------------- transactions


def test_transaction_commands_have_no_reply(memdict_client):
    memdict_client.send(
        "B7\tuser@example.org",
        "S7\tshared/a\t1",
        "U7\tshared/b",
        "A7\tshared/c\t5",
        "T7\t1700000000\t0",
        "B8\t",
        "R8",
    )
    assert memdict_client.silent()
    assert memdict_client.request("C7") == "O7"
    assert memdict_client.lookup("shared/a") == "O1"
    assert memdict_client.lookup("shared/c") == "O5"


def test_set_unset_atomic_inc_applied_at_commit(memdict_client):
    set_value(memdict_client, "shared/n", "10")
    set_value(memdict_client, "shared/gone", "x")
    memdict_client.send("B2\t", "A2\tshared/n\t-3", "U2\tshared/gone")
    # nothing is visible before the commit
    assert memdict_client.lookup("shared/n") == "O10"
    assert memdict_client.request("C2") == "O2"
    assert memdict_client.lookup("shared/n") == "O7"
    assert memdict_client.lookup("shared/gone") == "N"


def test_trailing_empty_value_is_kept_empty(memdict_client):
    memdict_client.send("B1\t", "S1\tshared/empty\t")
    assert memdict_client.request("C1") == "O1"
    assert memdict_client.lookup("shared/empty") == "O"


def test_commit_async_reply(memdict_client):
    memdict_client.send("B3\t", "S3\tshared/async\tv")
    assert memdict_client.request("D3") == "AO3"
    assert memdict_client.lookup("shared/async") == "Ov"


def test_commit_of_unknown_transaction_fails(memdict_client):
    assert memdict_client.request("C42").startswith("F42")
    assert memdict_client.request("D43").startswith("AF43")


def test_change_for_unknown_transaction_makes_commit_fail(memdict_client):
    memdict_client.send("S9\tshared/x\tv")
    assert memdict_client.silent()
    assert memdict_client.request("C9").startswith("F9")
    assert memdict_client.lookup("shared/x") == "N"


def test_rolled_back_transaction_is_gone(memdict_client):
    memdict_client.send("B4\t", "S4\tshared/rb\tv", "R4")
    assert memdict_client.request("C4").startswith("F4")
    assert memdict_client.lookup("shared/rb") == "N"


@pytest.mark.parametrize(
    "bad",
    [
        "S5\tshared/only-key",  # SET without value
        "S5\tshared/a\tb\tc",  # too many fields
        "U5",  # UNSET without key
        "A5\tshared/n\tnot-a-number",
        "S5\tshared/\x01broken\tv",  # broken escape
    ],
)
def test_malformed_change_fails_the_whole_transaction(memdict_client, bad):
    memdict_client.send("B5\t", "S5\tshared/good\tv", bad)
    assert memdict_client.silent()
    assert memdict_client.request("C5").startswith("F5")
    assert memdict_client.lookup("shared/good") == "N"


def test_commit_handler_failure_answers_f(memdict_client):
    memdict_client.send("B6\t", "S6\tshared/fail\tv")
    assert memdict_client.request("C6") == "F6"
    memdict_client.send("B6\t", "S6\tshared/refuse\tv")
    assert memdict_client.request("C6") == "F6"
    set_value(memdict_client, "shared/after", "ok", txid="6")
    assert memdict_client.lookup("shared/after") == "Ook"


def test_transaction_ids_are_per_connection(memdict):
    sock, _ = memdict
    with RawDictClient(sock) as a, RawDictClient(sock) as b:
        a.send("B1\t", "S1\tshared/from-a\t1")
        b.send("B1\t", "S1\tshared/from-b\t2")
        assert a.request("C1") == "O1"
        assert a.lookup("shared/from-b") == "N"  # b's txn 1 is still open
        assert b.request("C1") == "O1"
        assert a.lookup("shared/from-b") == "O2"


# ---------------------------------------------------------------- iterate


def fill(client: RawDictClient, n: int) -> None:
    client.send("B1\t", *(f"S1\tshared/it/{i:03d}\tval{i}" for i in range(n)))
    assert client.request("C1") == "O1"


def test_iterate_rows_and_end_line(memdict_client):
    fill(memdict_client, 5)
    rows = memdict_client.iterate("shared/it/")
    assert rows == [(f"shared/it/{i:03d}", f"val{i}") for i in range(5)]


def test_iterate_empty_result_still_ends(memdict_client):
    assert memdict_client.iterate("shared/nothing/") == []


def test_iterate_max_rows_and_no_value(memdict_client):
    fill(memdict_client, 10)
    rows = memdict_client.iterate("shared/it/", flags=ITER_NO_VALUE, max_rows=3)
    assert rows == [(f"shared/it/{i:03d}", "") for i in range(3)]


def test_iterate_old_style_without_user(memdict_client):
    fill(memdict_client, 2)
    memdict_client.send("I0\t0\tshared/it/")
    assert memdict_client.readline() == "Oshared/it/000\tval0"
    assert memdict_client.readline() == "Oshared/it/001\tval1"
    assert memdict_client.readline() == ""


# ---------------------------------------------------------------- framing


def test_oversize_line_is_refused_and_connection_survives(memdict_client):
    huge = "x" * (MAX_LINE + 10)
    assert memdict_client.lookup("shared/" + huge) == "F"
    assert memdict_client.lookup("shared/none") == "N"


def test_line_beyond_stream_limit_is_refused_too(memdict_client):
    huge = "y" * (3 * 1024 * 1024)
    assert memdict_client.lookup("shared/" + huge) == "F"
    set_value(memdict_client, "shared/small", "ok")
    assert memdict_client.lookup("shared/small") == "Ook"


def test_oversize_set_fails_its_transaction(memdict_client):
    memdict_client.send("B1\t", "S1\tshared/big\t" + "z" * (MAX_LINE + 1))
    assert memdict_client.silent()
    assert memdict_client.request("C1").startswith("F1")
    assert memdict_client.lookup("shared/big") == "N"


def test_line_of_exactly_max_length_is_accepted(memdict_client):
    line = "Lshared/" + "k" * (MAX_LINE - len("Lshared/"))
    assert len(line) == MAX_LINE
    assert memdict_client.request(line) == "N"


def test_pipelined_requests_are_answered_in_order(memdict_client):
    set_value(memdict_client, "shared/p", "P")
    lines = []
    expected = []
    for i in range(300):
        if i % 50 == 7:
            lines.append("Lshared/slow/0.05")
            expected.append("Oslept")
        elif i % 3 == 0:
            lines.append("Lshared/p")
            expected.append("OP")
        elif i % 3 == 1:
            lines.append(f"Lshared/missing{i}")
            expected.append("N")
        else:
            lines.append("Lshared/fail/x")
            expected.append("F")
    memdict_client.send(*lines)
    assert [memdict_client.readline() for _ in lines] == expected


def test_many_concurrent_connections(memdict):
    sock, _ = memdict
    clients = [RawDictClient(sock) for _ in range(300)]
    try:
        for i, c in enumerate(clients):
            c.send(f"Lshared/conn{i}")
        assert all(c.readline() == "N" for c in clients)
    finally:
        for c in clients:
            c.close()


def test_eof_mid_line_closes_only_that_connection(memdict):
    sock, daemon = memdict
    c = RawDictClient(sock)
    c.sock.sendall(b"Lshared/partial-without-newline")
    c.sock.shutdown(1)
    with pytest.raises(EOFError):
        c.readline()
    c.close()
    with RawDictClient(sock) as c2:
        assert c2.lookup("shared/x") == "N"
    assert daemon.proc.poll() is None
