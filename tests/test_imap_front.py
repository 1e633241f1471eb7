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


def _greeting_443(relay, alpn: str = "imap") -> bytes:
    """The first line a client asking port 443 for ALPN ``alpn`` gets."""
    ctx = client_tls_context()
    ctx.set_alpn_protocols([alpn])
    raw = socket.create_connection((relay.host, int(relay.ports["newemail"])), timeout=30)
    tls = ctx.wrap_socket(raw, server_hostname=relay.mail_domain)
    try:
        return tls.makefile("rb").readline()
    finally:
        tls.close()


def test_a_full_front_says_why_in_imap(tmp_path):
    """Past the mail connections' budget (max_imap_connections here) a client gets
    IMAP's own refusal with the limit's name, and the log names it too.  Port 993's
    front and port 443's IMAP tunnels are roles of one process: one budget."""
    with full_relay({"max_imap_connections": 3}) as small:
        held = [connect(small) for _ in range(2)]
        try:
            full = b"* BYE [UNAVAILABLE] mail connection limit reached\r\n"
            ctx = client_tls_context()
            ctx.set_alpn_protocols(["imap"])
            raw = socket.create_connection((small.host, int(small.ports["newemail"])), timeout=30)
            tunnel = ctx.wrap_socket(raw, server_hostname=small.mail_domain)
            assert tunnel.makefile("rb").readline().startswith(b"* OK ")  # the third, by 443
            held.append((tunnel, None))  # two on 993 and one on 443: the budget is spent
            raw = socket.create_connection((small.host, int(small.ports["imaps"])), timeout=30)
            tls = client_tls_context().wrap_socket(raw, server_hostname=small.mail_domain)
            greeting = tls.makefile("rb").readline()
            assert greeting == full
            tls.close()
            # port 443 passes its mail clients' TLS on; refused, it ends it itself to say why
            assert _greeting_443(small) == full
            assert _greeting_443(small, "smtp") == b"421 4.7.0 mail connection limit reached\r\n"
            log = small.log_dir / "newemail.log"
            wait_for(lambda: "chatmail-imaps" in log.read_text()
                     and "mail connection limit reached" in log.read_text(),
                     "the refusal is not logged")  # fmt: skip
        finally:
            for tls, _ in held:
                tls.close()


def test_a_burst_of_first_logins_right_after_the_start_all_get_in(tmp_path):
    """Devices all coming at once to a relay that has just started (issue 27, item 3).
    Dovecot 2.4's auth learns its auth-worker limit from the first worker's
    handshake; logins before it could each open a worker connection, and those
    past the limit failed ("Temporary authentication failure") unless the relay
    made one lookup at its start (stack.warm_dovecot_auth, the unit's ExecStartPost)."""
    import subprocess
    import sys
    from pathlib import Path

    with full_relay({"max_load_1m": 1000}) as fresh:  # the test host's load: no refusal
        accounts = tmp_path / "accounts.txt"
        lines = (" ".join(fresh.new_credentials()) + "\n" for _ in range(300))
        accounts.write_text("".join(lines))
        env = {**os.environ, "IDLEFLEET_AT_ONCE": "300"}
        fleet = subprocess.Popen(
            [sys.executable, "-m", "testing.idlefleet", fresh.host, str(fresh.ports["imaps"]),
             str(accounts), "0"],
            cwd=Path(__file__).parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        try:
            assert fleet.stdout is not None
            _, ok, failed, *_rest = fleet.stdout.readline().split(" ", 6)
        finally:
            fleet.communicate(timeout=120)
        assert (int(ok), int(failed)) == (300, 0), _rest
        assert "process_limit" not in (fresh.log_dir / "dovecot.log").read_text()


# ---------------------------------------------------------------- the server alone


@pytest.fixture
def front(tmp_path):
    """An HttpsServer in IMAP-front mode in a thread of its own, one handshake slot
    at a time, in front of a backend that answers with the PROXY v2 header's length
    and the first line it got after it."""
    import asyncio
    import logging
    import ssl
    import subprocess
    import threading

    from chatmaild.web.limits import Admission
    from chatmaild.web.server import HttpsServer, Settings

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "3", "-subj", "/CN=front.test", "-keyout", str(key),
         "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    where: dict[str, int] = {}

    async def backend(reader, writer):
        head = await reader.readexactly(16)
        body = await reader.readexactly(int.from_bytes(head[14:16], "big"))
        first = await reader.readline()
        writer.write(b"* header %d, then %s" % (16 + len(body), first))
        await writer.drain()
        await reader.read()

    async def main():
        back = await asyncio.start_server(backend, "127.0.0.1", 0)
        admission = Admission(max_handshakes=1, handshakes_per_minute=6000, handshake_burst=100)
        server = HttpsServer(None, tls, logging.getLogger("front-test"), Settings(), admission,
                             terminate_to=back.sockets[0].getsockname()[:2],
                             queue_handshakes=where["queue"])  # fmt: skip
        listening = await loop.create_server(server.protocol, "127.0.0.1", 0)
        where["port"] = listening.sockets[0].getsockname()[1]
        ready.set()
        await stop.wait()
        listening.close()
        back.close()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)

    def start(queue: bool) -> int:
        where["queue"] = queue
        thread.start()
        assert ready.wait(10)
        return where["port"]

    yield start
    if thread.is_alive():
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
    loop.close()


class MemoryTls:
    """A TLS client on memory BIOs over a plain socket: its ClientHello can go out
    without its reading the answer (a real socket's handshake might complete)."""

    def __init__(self, port: int) -> None:
        import ssl

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_tls_context().wrap_bio(self.incoming, self.outgoing)
        self._step()  # the ClientHello

    def _step(self) -> bool:
        import ssl

        try:
            self.tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        self.sock.sendall(self.outgoing.read())
        return done

    def do_handshake(self) -> None:
        while not self._step():
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("closed in the handshake")
            self.incoming.write(data)

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def recv(self) -> bytes:
        import ssl

        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self.incoming.write(self.sock.recv(65536))

    def close(self) -> None:
        self.sock.close()


def hellos_first(port: int, count: int) -> list[MemoryTls]:
    """``count`` connections whose ClientHellos are all sent before any handshake
    goes on: they all ask for the one slot at once."""
    conns = [MemoryTls(port) for _ in range(count)]
    time.sleep(0.3)
    return conns


def test_handshakes_past_the_slots_wait_their_turn(front):
    """A relay's restart: every device's ClientHello at once.  Each waits for a slot
    and gets through; Dovecot's side gets the PROXY v2 header first."""
    conns = hellos_first(front(queue=True), 8)
    for i, tls in enumerate(conns):
        tls.do_handshake()
        tls.sendall(b"a%d NOOP\r\n" % i)
        answer = tls.recv()
        assert answer.startswith(b"* header ") and answer.endswith(b"a%d NOOP\r\n" % i)
        tls.close()


def test_without_the_queue_they_would_be_refused(front):
    """The same crowd on a server that refuses past its slots (the web port): the
    queue above is what lets them in."""
    conns = hellos_first(front(queue=False), 4)
    conns[0].do_handshake()
    for tls in conns[1:]:
        with pytest.raises(OSError):  # reset, or closed without an answer
            tls.do_handshake()
    for tls in conns:
        tls.close()
