"""IMAP hibernation (issue 27, first step): an IDLE client costs no imap process.

After ``imap_hibernate_timeout`` in IDLE, Dovecot hands the client's connection
to imap-hibernate and its ``imap`` process lets go of it (the process serves up
to 10 clients and ends once it has none for a while); new mail wakes it (an
``imap`` process takes the connection back) and reaches it as EXISTS, and the
client stays in IDLE across it, again and again.  Who holds the client's TCP
connection tells which state it is in.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from testing.imapidle import IdleClient, tcp_connections_held
from testing.mails import encrypted_message

pytestmark = [pytest.mark.relay, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def relay():
    from tests.fixtures.relay import RelayPool, base_components

    pool = RelayPool()
    try:
        # with the web process: port 993's IMAP front, as on an installed relay
        yield pool({"imap_hibernate_timeout": 1, "max_user_send_per_minute": 600},
                   (*base_components(), "newemail"))  # fmt: skip
    finally:
        pool.close()


def dovecot_pids(relay, kind: str = "imap") -> list[int]:
    """This relay's Dovecot processes of ``kind`` (``imap``: not imap-login, not
    imap-hibernate)."""
    title = re.compile(rf"{re.escape(relay.layout.dovecot_instance)}/{kind}(\s.*)?$")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").strip()
        except OSError:
            continue
        if title.search(cmdline.decode(errors="replace")):
            found.append(int(pid))
    return found


def awake_clients(relay) -> int:
    """Client connections an ``imap`` process holds (up to 10 each)."""
    return sum(tcp_connections_held(pid) for pid in dovecot_pids(relay))


def hibernated_clients(relay) -> int:
    return sum(tcp_connections_held(pid) for pid in dovecot_pids(relay, "imap-hibernate"))


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_idle_client_hibernates_and_gets_new_mail(relay):
    sender, spw = relay.new_credentials()
    rcpt, rpw = relay.new_credentials()
    relay.imap(sender, spw).logout()
    client = IdleClient(relay.host, int(relay.ports["imaps"]), rcpt, rpw)
    try:
        assert awake_clients(relay) == 1  # awake: an imap process holds it
        with relay.smtp(sender, spw) as smtp:
            for round_ in range(3):
                client.idle()
                wait_until(lambda: awake_clients(relay) == 0, 20,
                           "no hibernation: an imap process still holds the client")  # fmt: skip
                assert hibernated_clients(relay) == 1
                smtp.sendmail(sender, [rcpt], encrypted_message(sender, [rcpt]))
                assert client.wait_exists(timeout=10) == round_ + 1
                # woken: a process holds the connection again, and IDLE goes on
                assert awake_clients(relay) == 1 and hibernated_clients(relay) == 0
                client.done()
        # logged out: nothing is left awake
        client.close()
        wait_until(lambda: awake_clients(relay) == 0, 10, "a client left in imap after logout")
    finally:
        client.close()


def test_hibernated_client_survives_imap_processes_being_killed(relay):
    sleeper, spw = relay.new_credentials()
    client = IdleClient(relay.host, int(relay.ports["imaps"]), sleeper, spw)
    awake_addr, apw = relay.new_credentials()
    try:
        client.idle()
        wait_until(lambda: awake_clients(relay) == 0, 20, "no hibernation")
        awake = IdleClient(relay.host, int(relay.ports["imaps"]), awake_addr, apw)
        assert awake_clients(relay) == 1
        pids = dovecot_pids(relay)
        for pid in pids:  # a crash of every imap process there is
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not set(pids) & set(dovecot_pids(relay)), 10,
                   "killed imap process still there")  # fmt: skip
        awake.sock.close()
        with relay.smtp(awake_addr, apw) as smtp:  # logs in anew: the account is fine
            smtp.sendmail(awake_addr, [sleeper], encrypted_message(awake_addr, [sleeper]))
        assert client.wait_exists(timeout=10) == 1  # the hibernated client never noticed
        client.done()
    finally:
        client.close()


def capability_after_login(relay, addr: str, password: str) -> set[str]:
    conn = relay.imap(addr, password)
    try:
        typ, data = conn.capability()
        assert typ == "OK"
        return set(data[0].decode().split())
    finally:
        conn.logout()


def test_compress_is_not_offered_by_default(relay):
    """COMPRESS keeps a client awake (no hibernation): a relay that hibernates does
    not offer it, on 2.3 and on 2.4, so the apps never ask for it."""
    addr, password = relay.new_credentials()
    assert not any(c.startswith("COMPRESS") for c in capability_after_login(relay, addr, password))


class DeflateImap:
    """An IMAP client that turns COMPRESS=DEFLATE on (RFC 4978: raw deflate both
    ways, each command flushed with Z_SYNC_FLUSH)."""

    def __init__(self, relay, addr: str, password: str) -> None:
        import socket
        import zlib

        from chatmaild.relay import client_tls_context

        raw = socket.create_connection((relay.host, int(relay.ports["imaps"])), timeout=30)
        self.sock = client_tls_context().wrap_socket(raw)
        self.buf = b""
        self.inflate = None
        self.deflate = None
        assert self.line().startswith(b"* OK")
        assert self.command(b"a", f'LOGIN {addr} "{password}"'.encode()).startswith(b"a OK")
        assert self.command(b"b", b"COMPRESS DEFLATE").startswith(b"b OK")
        self.inflate = zlib.decompressobj(-15)
        self.deflate = zlib.compressobj(wbits=-15)

    def send(self, data: bytes) -> None:
        import zlib

        if self.deflate is not None:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "closed by the server"
            self.buf += self.inflate.decompress(data) if self.inflate is not None else data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def command(self, tag: bytes, text: bytes) -> bytes:
        self.send(tag + b" " + text + b"\r\n")
        while not (answer := self.line()).startswith(tag + b" "):
            pass
        return answer


def test_compress_clients_still_work(tmp_path):
    """imap_compress = true: COMPRESS=DEFLATE is offered and works through port 993's
    front (SELECT, IDLE, new mail as EXISTS over the compressed stream); hibernation
    is off, so the client keeps its imap process."""
    from tests.fixtures.relay import RelayPool, base_components

    pool = RelayPool()
    try:
        relay = pool({"imap_compress": True, "imap_hibernate_timeout": 1},
                     (*base_components(), "newemail"))  # fmt: skip
        sender, spw = relay.new_credentials()
        rcpt, rpw = relay.new_credentials()
        assert "COMPRESS=DEFLATE" in capability_after_login(relay, rcpt, rpw)
        client = DeflateImap(relay, rcpt, rpw)
        assert client.command(b"c", b"SELECT INBOX").startswith(b"c OK")
        client.send(b"d IDLE\r\n")
        assert client.line().startswith(b"+")
        time.sleep(3)  # past imap_hibernate_timeout: no hibernation with COMPRESS
        assert awake_clients(relay) == 1 and hibernated_clients(relay) == 0
        with relay.smtp(sender, spw) as smtp:
            smtp.sendmail(sender, [rcpt], encrypted_message(sender, [rcpt]))
        while not (line := client.line()).endswith(b"EXISTS\r\n"):
            pass
        assert line == b"* 1 EXISTS\r\n"
        client.send(b"DONE\r\n")
        while not (line := client.line()).startswith(b"d "):
            pass
        assert line.startswith(b"d OK")
        client.sock.close()
    finally:
        pool.close()
