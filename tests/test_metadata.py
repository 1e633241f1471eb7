"""chatmail-metadata driven over its socket with Dovecot dict protocol lines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from chatmaild.common.config import read_config
from chatmaild.dictd.metadata import read_turn_credentials, server_key_name, turn_answer
from chatmaild.dictd.tokens import TOKEN_LIFETIME
from chatmaild.relay.ports import free_ports
from tests.fixtures.metadata import DOMAIN, wait_until

USER = f"alice123x@{DOMAIN}"
GUID = "0123456789abcdef0123456789abcdef"
TOKEN_KEY = f"priv/{GUID}/devicetoken"
NEW_KEY = f"priv/{GUID}/messagenew"
SERVER = "shared/{}/vendor/vendor.dovecot/pvt/server/vendor/deltachat/"


def server_key(name: str) -> str:
    return SERVER.format(GUID) + name


def metadata_file(ini) -> os.PathLike:
    return read_config(ini.path).mailboxes_path / USER / "metadata.json"


def queue_files(ini) -> list[str]:
    return sorted(os.listdir(read_config(ini.path).notification_dir))


def queued_devices(ini) -> dict[str, int]:
    """token -> its notification files in the queue."""
    found: dict[str, int] = {}
    queue = read_config(ini.path).notification_dir
    for name in os.listdir(queue):
        token = (Path(queue) / name).read_text().split("\n")[2]
        found[token] = found.get(token, 0) + 1
    return found


# ---------------------------------------------------------------- tokens


def test_two_devices_round_trip_and_refresh(metadata_daemon, metadata_ini):
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        assert c.lookup(TOKEN_KEY, USER) == "O"  # found, no tokens
        assert c.set(USER, TOKEN_KEY, "1111").startswith("O")
        assert c.set(USER, TOKEN_KEY, "2222").startswith("O")
        assert c.lookup(TOKEN_KEY, USER) == "O1111 2222"
        before = json.loads(metadata_file(metadata_ini).read_text())["devicetoken"]
        time.sleep(0.01)
        assert c.set(USER, TOKEN_KEY, "1111").startswith("O")
        after = json.loads(metadata_file(metadata_ini).read_text())["devicetoken"]
    assert after["1111"] > before["1111"]  # refreshed
    assert after["2222"] == before["2222"]
    assert list(after) == ["1111", "2222"]  # read-back order is unchanged


def test_expired_tokens_are_purged(metadata_daemon, metadata_ini):
    path = metadata_file(metadata_ini)
    path.parent.mkdir(parents=True)
    now = time.time()
    stored = {"old": now - TOKEN_LIFETIME - 10, "fresh": now - 3600, "future": now + 3600}
    path.write_text(json.dumps({"devicetoken": stored, "other": 1}))
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        assert c.lookup(TOKEN_KEY, USER) == "Ofresh"
    data = json.loads(path.read_text())
    assert data == {"devicetoken": {"fresh": stored["fresh"]}, "other": 1}


def test_legacy_list_is_migrated(metadata_daemon, metadata_ini):
    path = metadata_file(metadata_ini)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"devicetoken": ["aaa", "bbb"]}))
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        assert c.lookup(TOKEN_KEY, USER) == "Oaaa bbb"
    tokens = json.loads(path.read_text())["devicetoken"]
    assert set(tokens) == {"aaa", "bbb"}
    assert all(abs(ts - time.time()) < 60 for ts in tokens.values())


def test_corrupt_file_reads_empty_and_is_replaced(metadata_daemon, metadata_ini):
    path = metadata_file(metadata_ini)
    path.parent.mkdir(parents=True)
    path.write_text('{"devicetoken": {"abc": 1')
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        assert c.lookup(TOKEN_KEY, USER) == "O"
        assert c.set(USER, TOKEN_KEY, "newtok").startswith("O")
        assert c.lookup(TOKEN_KEY, USER) == "Onewtok"
    assert "is corrupt, reading it as empty" in metadata_daemon.log()


def test_bad_tokens_and_keys_fail(metadata_daemon):
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        assert c.set(USER, TOKEN_KEY, "two words").startswith("F")
        assert c.set(USER, TOKEN_KEY, "").startswith("F")
        assert c.set(USER, f"priv/{GUID}/somethingelse", "x").startswith("F")
        assert c.transaction(USER, [("unset", TOKEN_KEY, None)]).startswith("F")
        assert c.set("mallory@other.org", TOKEN_KEY, "tok").startswith("F")
        assert c.set(f"../../etc@{DOMAIN}", TOKEN_KEY, "tok").startswith("F")
        assert c.lookup(TOKEN_KEY, USER) == "O"
        assert c.lookup(f"priv/{GUID}/chatmail", USER) == "N"
        assert c.lookup("wrong/prefix/key", USER) == "N"
        assert c.lookup(server_key("unknown"), USER) == "N"


# ---------------------------------------------------------------- server keys


def test_server_keys(metadata_daemon, metadata_ini):
    metadata_ini(iroh_relay="https://iroh.example.org")
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        assert c.lookup(server_key("irohrelay"), USER) == "Ohttps://iroh.example.org"
        assert c.lookup(server_key("maxsmtprecipients"), USER) == "O1000"
        assert c.lookup(server_key("turn"), USER) == "N"  # nothing listens on the socket
        assert c.lookup(f"priv/{GUID}/vendor/deltachat/irohrelay", USER) == "N"


def test_iroh_relay_default_and_empty(metadata_daemon, metadata_ini):
    port = free_ports(1)[0]
    metadata_ini(iroh_relay_port=port)
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        # advertise only what exists: chatmail-iroh does not listen on its port
        assert c.lookup(server_key("irohrelay"), USER) == "N"
    metadata_daemon.stop()
    # our own relay answers, and the certificate is ACME's: https://<mail_domain>
    with socket.create_server(("127.0.0.1", port)):
        metadata_daemon.start()
        with metadata_daemon.client() as c:
            assert c.lookup(server_key("irohrelay"), USER) == f"Ohttps://{DOMAIN}"
        metadata_daemon.stop()
        # a self-signed certificate: the apps' iroh would not trust it
        metadata_ini(iroh_relay_port=port, acme_directory="")
        metadata_daemon.start()
        with metadata_daemon.client() as c:
            assert c.lookup(server_key("irohrelay"), USER) == "N"
        metadata_daemon.stop()
        metadata_ini(iroh_relay_port=0)  # no relay of our own wanted
        metadata_daemon.start()
        with metadata_daemon.client() as c:
            assert c.lookup(server_key("irohrelay"), USER) == "N"


class TurnServer:
    """A UNIX socket that hands each client one credentials line (like chatmail-turn)."""

    def __init__(self, path: str, line: bytes = b"1700000000:c2VjcmV0\n"):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(5)
        self.line = line
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.line)

    def close(self):
        self.sock.close()


@pytest.mark.parametrize(
    ("domain", "host"), [("chat.example.org", "chat.example.org"), ("1.2.3.4", "1.2.3.4")]
)
def test_turn_credentials(metadata_daemon, metadata_ini, domain, host):
    metadata_ini(mail_domain=domain)
    turn = TurnServer(read_config(metadata_ini.path).turn_socket_path)
    try:
        metadata_daemon.start()
        with metadata_daemon.client() as c:
            reply = c.lookup(server_key("turn"), f"bob@{domain}")
    finally:
        turn.close()
    assert reply == f"O{host}:3478:1700000000:c2VjcmV0"  # never "[1.2.3.4]"


def test_turn_socket_that_never_answers_times_out(sockdir):
    path = str(sockdir / "silent.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(path)
    silent.listen(1)  # accepts (backlog) but never writes
    try:
        assert asyncio.run(read_turn_credentials(path, timeout=0.3)) is None
        assert asyncio.run(read_turn_credentials(str(sockdir / "missing.sock"))) is None
    finally:
        silent.close()


def test_key_helpers():
    assert server_key_name(server_key("turn")) == "turn"
    assert server_key_name("shared/vendor/deltachat/turn/x") is None
    assert server_key_name(f"priv/{GUID}/vendor/deltachat/turn") is None
    assert turn_answer("[10.0.0.1]", 3478, "u:p\n") == "10.0.0.1:3478:u:p"
    assert turn_answer("h.org", 3478, "garbage") is None


# ---------------------------------------------------------------- notifications


def test_messagenew_posts_each_token(metadata_daemon, metadata_ini, http_sink):
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        c.set(USER, TOKEN_KEY, "dev1")
        c.set(USER, TOKEN_KEY, "dev2")
        assert c.set(USER, NEW_KEY, "").startswith("O")
    assert http_sink.wait_for(lambda s: sorted(s.tokens()) == ["dev1", "dev2"], 15)
    assert {p.path for p in http_sink.posts} == {"/notify"}
    assert wait_until(lambda: queue_files(metadata_ini) == [])


def test_messagenew_without_tokens_posts_nothing(metadata_daemon, metadata_ini, http_sink):
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        assert c.set(USER, NEW_KEY, "").startswith("O")
        # a second account with a token proves the notifier works at all
        c.set(f"bob456789@{DOMAIN}", TOKEN_KEY, "bobtok")
        c.set(f"bob456789@{DOMAIN}", NEW_KEY, "")
    assert http_sink.wait_for(lambda s: s.tokens() == ["bobtok"], 15)
    assert http_sink.tokens() == ["bobtok"]


def test_500_is_retried_and_410_removes_token(metadata_daemon, metadata_ini, http_sink):
    http_sink.script("flaky", [500, 500])
    http_sink.set_status("gone", 410)
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        c.set(USER, TOKEN_KEY, "flaky")
        c.set(USER, TOKEN_KEY, "gone")
        c.set(USER, NEW_KEY, "")
        assert http_sink.wait_for(lambda s: s.count("flaky", 200) == 1, 15)
        assert http_sink.count("flaky", 500) == 2
        assert http_sink.wait_for(lambda s: s.count("gone", 410) == 1, 15)
        assert wait_until(lambda: c.lookup(TOKEN_KEY, USER) == "Oflaky")
    assert wait_until(lambda: queue_files(metadata_ini) == [])
    assert "Notification request failed: HTTP 500" in metadata_daemon.log()


def test_sigkill_loses_no_notification(metadata_daemon, metadata_ini, http_sink):
    """Queued (failing) notifications survive kill -9 and are sent after restart."""
    http_sink.set_default(500)
    metadata_ini(notification_retry_delay="5")  # keep them waiting on disk
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        c.set(USER, TOKEN_KEY, "dev1")
        c.set(USER, TOKEN_KEY, "dev2")
        for _ in range(3):
            assert c.set(USER, NEW_KEY, "").startswith("O")
    # persisted before the commit was answered: per device one or two files (a
    # newer notification replaces the one waiting beside the request in flight)
    assert queued_devices(metadata_ini) in ({"dev1": n, "dev2": m} for n in (1, 2) for m in (1, 2))
    assert http_sink.wait_for(lambda s: len(s.tokens()) >= 2, 15)
    left = queue_files(metadata_ini)
    assert metadata_daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    assert queue_files(metadata_ini) == left

    http_sink.set_default(200)
    http_sink.clear()
    metadata_ini(notification_retry_delay="0.05")
    metadata_daemon.start()
    assert wait_until(lambda: queue_files(metadata_ini) == [])
    delivered = http_sink.tokens(200)
    # at least once per device; never more often than it had notifications queued
    assert 1 <= delivered.count("dev1") <= 3
    assert 1 <= delivered.count("dev2") <= 3
    assert f"requeued {len(left)} pending notifications" in metadata_daemon.log()


def test_sigterm_keeps_queue(metadata_daemon, metadata_ini, http_sink):
    http_sink.set_default(500)
    metadata_ini(notification_retry_delay="5")
    metadata_daemon.start()
    with metadata_daemon.client() as c:
        c.set(USER, TOKEN_KEY, "dev1")
        c.set(USER, NEW_KEY, "")
    assert http_sink.wait_for(lambda s: len(s.tokens()) >= 1, 15)
    assert metadata_daemon.kill(signal.SIGTERM) == 0
    assert len(queue_files(metadata_ini)) == 1


def test_missing_mailboxes_dir_exits_with_clear_error(metadata_daemon, metadata_ini, tmp_path):
    metadata_ini(mailboxes_dir=str(tmp_path / "nonexistent"))
    with pytest.raises(RuntimeError, match="exited"):
        metadata_daemon.start()
    assert metadata_daemon.proc.wait(10) == 1
    assert "mailboxes_dir" in metadata_daemon.log() and "does not exist" in metadata_daemon.log()


def test_token_store_cap_and_concurrent_writers(metadata_ini):
    from concurrent.futures import ThreadPoolExecutor

    from chatmaild.dictd.tokens import MAX_TOKENS, TokenStore

    config = read_config(metadata_ini.path)
    clock = iter(range(1_000_000_000, 2_000_000_000))
    store = TokenStore(config, clock=lambda: float(next(clock)))
    for i in range(MAX_TOKENS + 3):
        store.add(USER, f"t{i}")
    tokens = store.tokens(USER)
    assert len(tokens) == MAX_TOKENS
    assert tokens[0] == "t3"  # the three oldest-set went

    # many writers at once (separate stores, like separate processes): no token is lost
    other = f"frank1234@{DOMAIN}"
    real = TokenStore(config)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: TokenStore(config).add(other, f"p{i}"), range(24)))
    assert sorted(real.tokens(other)) == sorted(f"p{i}" for i in range(24))
    assert real.remove(other, "p5") and not real.remove(other, "p5")
