"""doveauth's HTTP responder (Dovecot 2.4's Lua passdb/userdb): the wire rules, then the
real daemon on its socket, asked the way dovecot/auth.lua asks and with hostile bytes."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatmaild.common.accounts import FLAG_DISABLED, AccountStore, verify_password
from chatmaild.common.config import read_config
from chatmaild.dictd.authhttp import (
    MAX_BODY,
    MAX_HEAD,
    HttpError,
    check_route,
    parse_form,
    parse_head,
)
from testing.authhttpclient import AuthHttpClient
from testing.rawdict import wait_for_socket
from tests.fixtures.dict import TEST_DOMAIN

ADDR = f"httpuser@{TEST_DOMAIN}"
PASSWORD = "a-long-enough-password"
PASSDB = frozenset({"user", "password"})


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# ---------------------------------------------------------------- wire rules


def test_request_head_as_dovecot_sends_it():
    request = parse_head(
        head(
            "POST http://doveauth/passdb HTTP/1.1",
            "Host: doveauth",
            "Date: Tue, 25 Nov 2025 14:00:00 GMT",
            "Content-Type: application/x-www-form-urlencoded",
            "Content-Length: 31",
        )
    )
    assert request.method == "POST" and request.path == "/passdb"
    assert request.keep_alive and request.content_length == 31
    assert check_route(request) == PASSDB
    assert parse_head(head("GET /users HTTP/1.1", "Connection: close")).keep_alive is False
    assert parse_head(head("GET /users HTTP/1.0")).keep_alive is False


@pytest.mark.parametrize(
    "raw, status",
    [
        (head("POST /passdb"), 400),
        (head("POST  /passdb HTTP/1.1"), 400),
        (head("POST /passdb HTTP/2.0"), 505),
        (head("POST /passdb SMTP/1.1"), 400),
        (head("POST passdb HTTP/1.1"), 400),
        (head("GET /users HTTP/1.1", "No colon here"), 400),
        (head("GET /users HTTP/1.1", "Bad Name: x"), 400),
        (head("GET /users HTTP/1.1", "X-A: 1", " folded"), 400),
        (head("GET /users HTTP/1.1", "X-A: \x01"), 400),
        (head("POST /passdb HTTP/1.1", "Content-Length: 1", "Content-Length: 1"), 400),
        (head("POST /passdb HTTP/1.1", "Content-Length: -1"), 400),
        (head("POST /passdb HTTP/1.1", "Content-Length: 99999999999"), 400),
        (head("POST /passdb HTTP/1.1", f"Content-Length: {MAX_BODY + 1}"), 413),
        (head("POST /passdb HTTP/1.1", "Transfer-Encoding: chunked"), 501),
        (head("GET /users HTTP/1.1", *[f"X-{i}: 1" for i in range(40)]), 431),
        (b"GET /users HTTP/1.1\n\n", 400),
        ("GET /ü HTTP/1.1\r\n\r\n".encode(), 400),
    ],
)
def test_malformed_heads_are_refused_with_a_status(raw, status):
    with pytest.raises(HttpError) as refused:
        parse_head(raw)
    assert refused.value.status == status


@pytest.mark.parametrize(
    "line, status",
    [
        ("GET /nothing HTTP/1.1", 404),
        ("GET /passdb HTTP/1.1", 405),
        ("POST /users HTTP/1.1", 405),
        ("POST /passdb HTTP/1.1", 415),  # no form content type
    ],
)
def test_routes(line, status):
    with pytest.raises(HttpError) as refused:
        check_route(parse_head(head(line)))
    assert refused.value.status == status


def test_form_fields_exactly_once():
    assert parse_form(b"user=a%40b&password=p%26%3D%2B+x", PASSDB) == {
        "user": "a@b",
        "password": "p&=+ x",
    }
    # bytes that are not UTF-8 reach the rules as surrogate escapes, like over the dict
    assert parse_form(b"user=a&password=%FF", PASSDB)["password"] == "\udcff"
    for body in (
        b"",
        b"user=a",
        b"user=a&password=b&x=c",
        b"user=a&user=b&password=c",
        b"user=a&password=b\xc3\xa4",
        b"user=a&password=%00",
        b"user&password=b",
    ):
        with pytest.raises(HttpError) as refused:
            parse_form(body, PASSDB)
        assert refused.value.status == 400, body


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_HEAD + 64))
def test_any_head_is_parsed_or_refused(data):
    # whatever arrives, the answer is a RequestHead or an HttpError with a status to send
    for raw in (data, data + b"\r\n\r\n"):
        try:
            check_route(parse_head(raw))
        except HttpError as e:
            assert 400 <= e.status < 600


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_BODY))
def test_any_form_body_is_parsed_or_refused(data):
    try:
        fields = parse_form(data, PASSDB)
    except HttpError as e:
        assert e.status == 400
    else:
        assert set(fields) == PASSDB


# ---------------------------------------------------------------- the real daemon


@pytest.fixture
def http_doveauth(doveauth, tmp_path):
    ini, _, daemon = doveauth
    sock = tmp_path / "doveauth-http.socket"
    wait_for_socket(sock, proc=daemon.proc)
    return read_config(ini), sock, daemon


def test_socket_is_for_the_vmail_user_only(http_doveauth):
    _, sock, _ = http_doveauth
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_first_login_creates_then_answers_the_hash(http_doveauth):
    config, sock, _ = http_doveauth
    with AuthHttpClient(sock) as client:
        created = client.passdb(ADDR, PASSWORD)
        # made with this password: answered in the PLAIN scheme, Dovecot only compares
        assert created == {"result": "ok", "password": "{PLAIN}" + PASSWORD}
        stored = AccountStore(config).account(ADDR).password_hash()
        assert verify_password(PASSWORD, stored)
        # a wrong password gets the stored hash: Dovecot verifies it and refuses
        again = client.passdb(ADDR.upper(), "another-password-entirely")
        assert again == {"result": "ok", "password": stored, "user": ADDR}
        user = client.userdb(ADDR)
        account = AccountStore(config).account(ADDR)
        assert user == {"result": "ok", "home": str(account.home), "uid": config.vmail_user,
                        "gid": config.vmail_user}  # fmt: skip
        assert "password" not in client.userdb(ADDR.upper())
        assert client.users() == [ADDR]


@pytest.mark.parametrize(
    "user, password",
    [(ADDR, "short"), (f"ab@{TEST_DOMAIN}", PASSWORD), (f"x@other.{TEST_DOMAIN}", PASSWORD)],
)
def test_refused_creation_is_unknown(http_doveauth, user, password):
    _, sock, _ = http_doveauth
    with AuthHttpClient(sock) as client:
        assert client.passdb(user, password) == {"result": "unknown"}
        assert client.userdb(user) == {"result": "unknown"}
        assert client.users() == []


def test_nocreate_and_disabled_accounts(http_doveauth):
    config, sock, _ = http_doveauth
    store = AccountStore(config)
    with AuthHttpClient(sock) as client:
        assert client.passdb(ADDR, PASSWORD)["result"] == "ok"
        store.set_registration_blocked(True)
        assert client.passdb(f"other1234@{TEST_DOMAIN}", PASSWORD) == {"result": "unknown"}
        assert client.passdb(ADDR, PASSWORD)["result"] == "ok"  # existing accounts still work
        store.set_registration_blocked(False)
        store.account(ADDR).set_flag(FLAG_DISABLED, True)
        assert client.passdb(ADDR, PASSWORD) == {"result": "unknown"}


def test_parallel_first_logins_make_one_account(http_doveauth):
    config, sock, _ = http_doveauth
    answers: list[str] = []

    def login(i: int) -> None:
        with AuthHttpClient(sock) as client:
            answers.append(client.passdb(ADDR, f"{PASSWORD}-{i}")["password"])

    threads = [threading.Thread(target=login, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # one account, made from exactly one of the passwords: that login is answered
    # its password (PLAIN), every other one the stored hash
    stored = AccountStore(config).account(ADDR).password_hash()
    made = [f"{PASSWORD}-{i}" for i in range(50) if verify_password(f"{PASSWORD}-{i}", stored)]
    assert len(made) == 1
    assert sorted(answers) == sorted([stored] * 49 + ["{PLAIN}" + made[0]])


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"BREW /passdb HTTP/1.1\r\n\r\n", 405),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS hello
        (b"GET /users HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"POST /passdb HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"GET /" + b"a" * (MAX_HEAD + 10) + b" HTTP/1.1\r\n\r\n", 431),
        (b"POST /passdb HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
         b"Content-Length: 6\r\n\r\nuser=a", 400),
        (b"GET /users HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 400),
    ],
)  # fmt: skip
def test_hostile_requests_are_answered_and_closed(http_doveauth, raw, status):
    _, sock, daemon = http_doveauth
    with AuthHttpClient(sock) as client:
        client.send_raw(raw)
        response = client.read_response()
        assert response is not None and response.status == status, response
        assert response.headers["connection"] == "close"
        assert client.closed_by_server()
    with AuthHttpClient(sock) as client:  # the daemon is still fine
        assert client.passdb(ADDR, PASSWORD)["result"] == "ok"
    assert daemon.proc.poll() is None


def test_keep_alive_and_half_requests(http_doveauth):
    _, sock, daemon = http_doveauth
    with AuthHttpClient(sock) as client:
        for _ in range(3):  # one connection, several requests (as Dovecot keeps it)
            assert client.passdb(ADDR, PASSWORD)["result"] == "ok"
    with AuthHttpClient(sock) as client:  # a client that hangs up mid-head gets nothing
        client.send_raw(b"POST /passdb HTTP/1.1\r\nContent-Le")
    with AuthHttpClient(sock) as client:
        assert client.users() == [ADDR]
    assert daemon.proc.poll() is None
