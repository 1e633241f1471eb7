"""Memory of the web process per connection, after warm-up (issue 24, item 5).

The web process ends the TLS of port 993 for every IMAP login.  In the hour's
soak it grew 1.4 MB an hour while it did (0.31 KB per TLS handshake, heap
fragmentation: asyncio's 256 KiB reads, now 64 KiB (service.py), and the heap
handed back after every 1,000 connections (web/server.py)).  Here, on a
``make run`` relay: the web process's RSS growth per ROUND connections, after a
warm-up, for plain TCP connections (connect, close), TLS handshakes on
993 (handshake, close) and whole IMAP logins through 993 (login, logout).

Target: no growth after warm-up (well under 0.05 KB per connection).
"""

from __future__ import annotations

import imaplib
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.proc import rss_mb
from chatmaild.relay.stack import Relay, client_tls_context
from chatmaild.web.server import TRIM_EVERY, TRIM_INTERVAL

COMPONENTS = ["postfix", "dovecot", "doveauth", "filtermail", "newemail"]
ROUND = int(os.environ.get("WEBGROWTH_ROUND", "500"))
ROUNDS = int(os.environ.get("WEBGROWTH_ROUNDS", "4"))
TARGET_KB_PER_CONNECTION = 0.05
# one client, one connection at a time, under the per-source handshake rate (20 a
# second): what a steady stream of logins is, not a crowd (the web process gives a
# crowd's memory back after it, README "The web port")
PACE = 0.05


def _growth_kb(pid: int, connect: Callable[[], None]) -> list[float]:
    """RSS growth (KB) over each of ROUNDS rounds of ROUND connections, after a warm-up
    that lasts until the web process has handed its heap back once (it does after
    every TRIM_EVERY connections, at most once a TRIM_INTERVAL; the first time costs
    ctypes, ~0.2 MB, once)."""
    start = time.monotonic()
    warmed = 0
    while warmed < max(ROUND, TRIM_EVERY) or time.monotonic() - start < TRIM_INTERVAL + 15:
        connect()
        time.sleep(PACE)
        warmed += 1
    rounds = []
    for _ in range(ROUNDS):
        time.sleep(1.0)  # closes reach the server
        before = rss_mb(pid)
        for _ in range(ROUND):
            connect()
            time.sleep(PACE)
        time.sleep(1.0)
        rounds.append((rss_mb(pid) - before) * 1024)
    return rounds


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-webgrowth-") as tmp:
        Path(tmp).chmod(0o755)
        with Relay(Path(tmp) / "relay", {}, components=COMPONENTS) as relay:
            pid = relay.pid_of("newemail")
            assert pid is not None
            host, port = relay.host, int(relay.ports["imaps"])
            addr, password = relay.new_credentials()
            relay.imap(addr, password).logout()
            tls = client_tls_context()

            def tcp() -> None:
                socket.create_connection((host, port)).close()

            def handshake() -> None:
                with (
                    socket.create_connection((host, port)) as raw,
                    tls.wrap_socket(raw, server_hostname=host) as conn,
                ):
                    conn.recv(100)  # the greeting: Dovecot's, through the front

            def login() -> None:
                imap = imaplib.IMAP4_SSL(host, port, ssl_context=tls)
                imap.login(addr, password)
                imap.logout()

            for name, connect in [("tcp", tcp), ("tls", handshake), ("login", login)]:
                rounds = _growth_kb(pid, connect)
                per = sum(rounds) / (ROUND * ROUNDS)  # the heap handed back now and then: net
                ok = per <= TARGET_KB_PER_CONNECTION
                print(
                    f"webgrowth_{name}: {per:.3f} KB per connection after warm-up"
                    f" (RSS growth per {ROUND}: {', '.join(f'{kb:+.0f}' for kb in rounds)} KB;"
                    f" web RSS {rss_mb(pid):.1f} MB; target <= {TARGET_KB_PER_CONNECTION}:"
                    f" {'met' if ok else 'MISSED'})",
                    flush=True,
                )
