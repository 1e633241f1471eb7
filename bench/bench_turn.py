"""TURN (coturn) figures: relayed UDP throughput and memory per allocation.

A relay (coturn from Debian, our configuration) and the client in a network
namespace of their own, the peer in a second one behind a veth pair, as in
tests/test_turn.py.  The client (aioice) sends datagrams through its
allocation as fast as it can; the peer counts what arrives.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

from aioice.turn import TurnClientUdpProtocol

from bench.proc import rss_mb
from chatmaild.common.turn import credentials
from testing.netns import far_network, far_socket, private_network
from tests.fixtures.relay import RelayPool

RELAY_SIDE, PEER_SIDE = "203.0.113.1", "203.0.113.2"
DATAGRAMS = 20000
SIZE = 1000  # bytes: a video packet's order of size
ALLOCATIONS = 200
BATCH = 32  # datagrams sent back to back, then 1 ms pause


def turnserver_pid(relay) -> int:
    return int((relay.run_dir / "turn.relay-pid").read_text())


async def allocate(server, user, password) -> TurnClientUdpProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: TurnClientUdpProtocol(server, user, password, 600, 300), remote_addr=server
    )
    await proto.connect()
    return proto


async def measure(relay, netns: str) -> None:
    secret = (relay.state_dir / "etc/turn.secret").read_text().strip()
    user, password = credentials(secret, time.time(), 3600)
    server = ("127.0.0.1", relay.config.turn_port)
    peer = far_socket(netns, PEER_SIDE)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    peer.settimeout(2)
    proto = await allocate(server, user, password)
    payload = os.urandom(SIZE)
    await proto.send_data(payload, peer.getsockname())  # binds the channel
    peer.recvfrom(4096)
    counted = {"n": 0, "last": 0.0}

    def count() -> None:  # the peer reads while the client sends
        peer.settimeout(1)
        try:
            while counted["n"] < DATAGRAMS:
                peer.recvfrom(4096)
                counted["n"] += 1
                counted["last"] = time.monotonic()
        except TimeoutError:
            pass

    reader = threading.Thread(target=count)
    reader.start()
    start = time.monotonic()
    for i in range(DATAGRAMS):
        await proto.send_data(payload, peer.getsockname())
        if i % BATCH == 0:
            # paced: a burst larger than coturn's socket buffer is dropped, not relayed
            await asyncio.sleep(0.001)
    await asyncio.to_thread(reader.join)
    received = counted["n"]
    elapsed = counted["last"] - start
    mbit = received * SIZE * 8 / elapsed / 1e6
    lost = 100 * (1 - received / DATAGRAMS)
    print(f"TURN relayed UDP, client -> peer: {mbit:.0f} Mbit/s,"
          f" {received / elapsed:.0f} datagrams/s of {SIZE} bytes, {lost:.1f} % lost")  # fmt: skip
    await proto.delete()
    peer.close()
    # memory: coturn's RSS before and with ALLOCATIONS allocations
    pid = turnserver_pid(relay)
    before = rss_mb(pid)
    protos = [await allocate(server, user, password) for _ in range(ALLOCATIONS)]
    after = rss_mb(pid)
    print(f"coturn RSS: {before:.1f} MB idle, {(after - before) * 1024 / ALLOCATIONS:.1f} KB"
          f" per allocation ({ALLOCATIONS} allocations)")  # fmt: skip
    for p in protos:
        await p.delete()


def main() -> None:
    if os.geteuid() != 0:
        print("bench_turn: needs root (network namespaces, Postfix and Dovecot)")
        return
    with private_network(), far_network(f"bench-peers-{os.getpid()}", RELAY_SIDE, (PEER_SIDE,)):
        pool = RelayPool()
        try:
            overrides = {
                "mail_domain": "127.0.0.1",
                "turn_relay_ip": RELAY_SIDE,
                "turn_max_bps": 10**9,  # the figure is coturn's, not the limit's
            }
            relay = pool(overrides, ("postfix", "dovecot", "doveauth", "metadata", "turn"))
            asyncio.run(measure(relay, f"bench-peers-{os.getpid()}"))
        finally:
            pool.close()
