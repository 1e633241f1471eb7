"""Attacks on a relay's web port, and the mail figures measured meanwhile (issue 26).

An attack runs in a process of its own (``python -m testing.webattack KIND``),
so that its CPU is its own, as a real attacker's would be, sharing the
machine's cores with the relay; it prints one JSON line of counts at the end.
Connections come from SOURCES local addresses, 127.0.0.2 and up (one by default;
a botnet is many), never from 127.0.0.1, where the legitimate clients are.
Standard library only: it also runs inside the booted test machines.

Kinds:
  forged-host  CONNECTIONS keep-alive connections asking GET / and /invite.svg
               with a made-up ``Host: 127.0.0.1:<2,270 letters>``, new letters each time
  long-host    the same with a Host field over the line limit (refused with 400)
  handshakes   a recorded TLS ClientHello replayed on fresh connections, CONNECTIONS
               at a time, each closed once the server has answered with anything
  idle         CONNECTIONS connections that send nothing, held for --seconds; with --tls, each
               finishes its handshake first and then sends nothing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import ssl
import statistics
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_hello() -> bytes:
    """The first flight of a TLS client, recorded once and replayed as it is."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _client_tls().wrap_bio(incoming, outgoing, server_hostname="chat.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _letters(n: int) -> str:
    return "".join(random.choices(string.ascii_letters, k=n))


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _requests(
    port: int, host: Callable[[], str], until: float, counts: Counter, source: str
) -> None:
    ctx = _client_tls()
    paths = ("/", "/invite.svg")
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, local_addr=(source, 0)
            )
        except (OSError, ssl.SSLError):
            counts["connect failed"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < until:
                path = paths[counts["sent"] % 2]
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host()}\r\n\r\n".encode())
                counts["sent"] += 1
                counts[f"status {await _read_response(reader)}"] += 1
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError, IndexError):
            counts["connection closed"] += 1
        finally:
            writer.close()


async def _handshakes(port: int, hello: bytes, until: float, counts: Counter, source: str) -> None:
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            counts["connect failed"] += 1
            await asyncio.sleep(0.01)
            continue
        try:
            writer.write(hello)
            answer = await asyncio.wait_for(reader.read(4096), 5)
            counts["answered" if answer else "closed"] += 1
        except (OSError, TimeoutError):
            counts["reset"] += 1
        finally:
            writer.transport.abort()


def _idle(port: int, connections: int, sources: int, seconds: float, tls: bool) -> Counter:
    counts: Counter = Counter()
    held = []
    ctx = _client_tls()
    for i in range(connections):
        sock = socket.socket()
        sock.bind((source_address(i, sources), 0))
        sock.settimeout(10)
        try:
            sock.connect(("127.0.0.1", port))
            if tls:
                sock = ctx.wrap_socket(sock)
        except (OSError, ssl.SSLError):
            counts["refused"] += 1
            sock.close()
            continue
        held.append(sock)
    counts["opened"] = len(held)
    print(json.dumps({"event": "held", "open": len(held)}), flush=True)
    time.sleep(seconds)
    for sock in held:
        try:
            sock.setblocking(False)
            if isinstance(sock, ssl.SSLSocket):
                still = sock.recv(1) != b""
            else:
                still = sock.recv(1, socket.MSG_PEEK) != b""
        except (BlockingIOError, ssl.SSLWantReadError):
            still = True
        except OSError:  # ssl.SSLError too
            still = False
        counts["still open" if still else "closed by the server"] += 1
        sock.close()
    return counts


def source_address(i: int, sources: int) -> str:
    """The local address connection ``i`` comes from: 127.0.0.2 and up, never 127.0.0.1,
    the address of the legitimate clients a test runs meanwhile."""
    return f"127.0.{(2 + i % sources) // 256}.{(2 + i % sources) % 256}"


def run(kind: str, port: int, seconds: float, connections: int, sources: int, tls: bool) -> dict:
    until = time.monotonic() + seconds

    def source(i: int) -> str:
        return source_address(i, sources)

    counts: Counter = Counter()
    if kind == "idle":
        counts = _idle(port, connections, sources, seconds, tls)
    else:

        async def attack() -> None:
            if kind == "handshakes":
                hello = client_hello()
                jobs = [
                    _handshakes(port, hello, until, counts, source(i)) for i in range(connections)
                ]
            else:
                length = 2270 if kind == "forged-host" else 9000
                jobs = [
                    _requests(
                        port, lambda: f"127.0.0.1:{_letters(length)}", until, counts, source(i)
                    )
                    for i in range(connections)
                ]
            await asyncio.gather(*jobs)

        asyncio.run(attack())
    return {"kind": kind, "seconds": seconds, **counts}


def command(kind: str, port: int, seconds: float, **options: object) -> list[str]:
    """The argv of an attack: ``options`` are the flags (True: a flag alone)."""
    cmd = [sys.executable, "-m", "testing.webattack", kind, "--port", str(port),
           "--seconds", str(seconds)]  # fmt: skip
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def start(argv: list[str]) -> subprocess.Popen:
    """An attack (``command()``, perhaps wrapped, e.g. into a network namespace) running."""
    # a session of its own, as a local attacker's login would be: the kernel shares the
    # CPU between sessions, and the attacker must not take its share from the mail probe's
    return subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen) -> dict:
    """The counts of a finished attack."""
    out, _ = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"attack failed ({proc.returncode}): {out[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- the mail side


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class MailProbe:
    """Submission latency (submit -> 250, one authenticated connection) and throughput
    (``connections`` connections at once) of a relay, for ``seconds`` each."""

    def __init__(self, relay, sender, recipient, message: Callable[[str, str], bytes]) -> None:
        self.relay, self.sender, self.message = relay, sender, message
        # throughput's connections send to these in turns: one mailbox, or several
        self.recipients = [recipient]

    @property
    def recipient(self) -> str:
        """The latency probe's recipient (the first)."""
        return self.recipients[0]

    def latency(self, seconds: float) -> dict:
        addr, password = self.sender
        times, failures = [], []
        with self.relay.smtp(addr, password) as smtp:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                msg = self.message(addr, self.recipient)
                start = time.perf_counter()
                try:
                    smtp.sendmail(addr, [self.recipient], msg)
                except Exception as e:  # noqa: BLE001 (a failed submission is a figure)
                    failures.append(repr(e))
                    break
                times.append(time.perf_counter() - start)
        return {
            "count": len(times),
            "p50_ms": 1000 * statistics.median(times) if times else float("nan"),
            "p90_ms": 1000 * percentile(times, 90),
            "max_ms": 1000 * max(times, default=float("nan")),
            "failures": failures,
        }

    def throughput(self, seconds: float, connections: int = 4) -> dict:
        addr, password = self.sender
        sent, failures = [0] * connections, []
        until = time.monotonic() + seconds

        def worker(i: int) -> None:
            try:
                with self.relay.smtp(addr, password) as smtp:
                    while time.monotonic() < until:
                        # the connections take the recipients in turns
                        n = i + sent[i] * connections
                        rcpt = self.recipients[n % len(self.recipients)]
                        smtp.sendmail(addr, [rcpt], self.message(addr, rcpt))
                        sent[i] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"msg_per_s": sum(sent) / (time.monotonic() - start), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=("forged-host", "long-host", "handshakes", "idle"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--sources", type=int, default=1, help="local addresses to come from")
    parser.add_argument("--tls", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.kind, args.port, args.seconds, args.connections, args.sources, args.tls)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
