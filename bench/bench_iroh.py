"""chatmail-iroh figures: forwarding throughput, round-trip latency through the
relay, and memory per connected node.

The daemon runs as a process of its own (as under systemd) on loopback with its
rate limit lifted (the figure is the relay's, not the limit's); the clients
are testing.irohclient in this process (which may be the slower side: the
figures are a floor).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.proc import rss_mb
from chatmaild.common.config import write_config
from chatmaild.relay.ports import free_ports
from testing.irohclient import IrohClient
from testing.processes import wait_listening

NODES = int(os.environ.get("BENCH_IROH_NODES", "1000"))
ROUND_TRIPS = 2000
WINDOW = 128  # packets in flight


async def throughput(port: int, size: int, count: int) -> None:
    a = await IrohClient.connect("127.0.0.1", port)
    b = await IrohClient.connect("127.0.0.1", port)
    await asyncio.sleep(0.2)
    payload = os.urandom(size)
    start = time.monotonic()

    received, last = 0, start
    progress = asyncio.Event()

    async def send() -> None:
        # at most WINDOW packets on their way: the figure is the relay's, not what a
        # slow Python receiver drops (the relay's queue per node is bounded, as iroh's)
        for i in range(count):
            while i - received >= WINDOW:
                progress.clear()
                await progress.wait()
            a.send(b.key, payload)
            if i % 16 == 0:
                await a.drain()
        await a.drain()

    sender = asyncio.create_task(send())
    try:
        while received < count:
            await b.packet(timeout=2.0)
            received += 1
            last = time.monotonic()
            progress.set()
    except TimeoutError:
        pass
    sender.cancel()
    elapsed = last - start
    print(f"iroh relay forwarding, {size}-byte packets: {received / elapsed:.0f} packets/s,"
          f" {received * size * 8 / elapsed / 1e6:.0f} Mbit/s,"
          f" {100 * (1 - received / count):.1f} % lost")  # fmt: skip
    await a.close()
    await b.close()


async def latency(port: int) -> None:
    a = await IrohClient.connect("127.0.0.1", port)
    b = await IrohClient.connect("127.0.0.1", port)
    await asyncio.sleep(0.2)
    times = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        a.send(b.key, b"ping")
        await b.packet()
        b.send(a.key, b"pong")
        await a.packet()
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=100)
    print(f"iroh relay round trip (two forwards): p50 {q[49]:.2f} ms, p99 {q[98]:.2f} ms")
    await a.close()
    await b.close()


async def memory(port: int, pid: int) -> None:
    before = rss_mb(pid)
    nodes = []
    for _ in range(NODES):
        nodes.append(await IrohClient.connect("127.0.0.1", port))
    await asyncio.sleep(1.0)  # every ClientInfo processed
    after = rss_mb(pid)
    print(f"chatmail-iroh RSS: {before:.1f} MB idle, {(after - before) * 1024 / NODES:.1f} KB"
          f" per connected node ({NODES} nodes)")  # fmt: skip
    for n in nodes:
        await n.close()


def main() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="bench-iroh-") as tmp:
        port = free_ports(1)[0]
        ini = write_config(Path(tmp) / "chatmail.ini", mail_domain="bench.example",
                           mailboxes_dir=f"{tmp}/mail", iroh_relay_port=port,
                           iroh_relay_max_bps=10**9, iroh_relay_max_clients=100_000,
                           iroh_relay_max_clients_per_ip=100_000)  # fmt: skip
        log = open(Path(tmp) / "iroh.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "chatmaild.iroh.main", "--config", str(ini)],
                                stdout=log, stderr=log)  # fmt: skip
        try:
            wait_listening(("127.0.0.1", port), proc)

            async def run() -> None:
                await throughput(port, 1200, 50_000)  # a QUIC datagram's size
                await throughput(port, 16_384, 10_000)
                await latency(port)
                await memory(port, proc.pid)

            asyncio.run(run())
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
