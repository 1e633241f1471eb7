"""chatmail-iroh, the relay's own iroh relay (issue 22): frames (pure), then the
daemon as a process, spoken to by testing.irohclient.

The real Delta Chat core's realtime channel through it is in test_realtime.py.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chatmaild.iroh import frames
from chatmaild.iroh.frames import FrameError, FrameType
from chatmaild.iroh.hub import Hub
from chatmaild.relay.ports import free_ports
from testing.irohclient import IrohClient, client_info
from testing.processes import wait_listening
from tests.fixtures.dict import write_test_ini

# ---------------------------------------------------------------- frames, hub (pure)


def test_reader_splits_frames_across_reads_and_refuses_long_ones_early():
    stream = frames.encode(FrameType.PING, b"12345678") + frames.encode(FrameType.KEEP_ALIVE)
    reader = frames.FrameReader()
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == [(FrameType.PING, b"12345678"), (FrameType.KEEP_ALIVE, b"")]
    assert reader.pending == 0
    with pytest.raises(FrameError, match="over"):
        # only the header: the length alone is refused, nothing waits for 1 MiB
        frames.FrameReader().feed(frames.HEADER.pack(FrameType.SEND_PACKET, 2**20))


def test_client_info_signature_is_checked():
    secret = Ed25519PrivateKey.generate()
    frame = client_info(secret)
    content = frame[frames.HEADER.size :]
    key, version = frames.client_info(content)
    assert version == frames.PROTOCOL_VERSION and len(key) == 32
    forged = bytearray(content)
    forged[-1] ^= 0x01  # the signed message changed
    with pytest.raises(FrameError, match="signature"):
        frames.client_info(bytes(forged))
    with pytest.raises(FrameError, match="magic"):
        frames.client_info(b"X" * len(content))
    with pytest.raises(FrameError):
        frames.client_info(content[:40])


class FakeNode:
    def __init__(self, key: bytes, room: int = 10) -> None:
        self.key, self.room, self.got, self.ended = key, room, [], False

    def deliver(self, frame: bytes) -> bool:
        if len(self.got) >= self.room:
            return False
        self.got.append(frame)
        return True

    def replaced(self) -> None:
        self.ended = True


def test_hub_forwards_counts_drops_and_says_who_left():
    hub = Hub()
    a, b, c = FakeNode(b"a" * 32), FakeNode(b"b" * 32, room=1), FakeNode(b"c" * 32)
    for n in (a, b, c):
        hub.register(n)
    assert hub.forward(a.key, b.key, b"hello")
    assert b.got == [frames.recv_packet(a.key, b"hello")]
    assert not hub.forward(a.key, b.key, b"more")  # b's queue is full
    assert not hub.forward(a.key, b"x" * 32, b"lost")  # nobody there
    assert (hub.counters.packets, hub.counters.busy, hub.counters.no_peer) == (1, 1, 1)
    hub.forward(a.key, c.key, b"hi")
    hub.unregister(a)
    assert c.got[-1] == frames.encode(FrameType.PEER_GONE, a.key)
    # a node connecting again replaces its older connection, whose end changes nothing
    c2 = FakeNode(c.key)
    hub.register(c2)
    assert c.ended and hub.nodes[c.key] is c2
    hub.unregister(c)
    assert hub.nodes[c.key] is c2


# ---------------------------------------------------------------- the daemon


@pytest.fixture
def iroh(tmp_path, daemon_factory):
    port = free_ports(1)[0]
    ini = write_test_ini(tmp_path, iroh_relay_port=port, iroh_relay_max_clients_per_ip=4,
                         iroh_relay_max_bps=200_000)  # fmt: skip
    daemon = daemon_factory("chatmaild.iroh.main", ini, args=["--stats-interval", "0.2"])
    try:
        wait_listening(("127.0.0.1", port), daemon.proc)
    except RuntimeError as e:
        raise AssertionError(daemon.log()) from e
    daemon.port = port
    return daemon


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def http_get(port: int, path: str, extra: str = "") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: relay.test\r\n{extra}\r\n".encode())
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def test_probes_answer_as_iroh_relays_do(iroh):
    got = http_get(iroh.port, "/generate_204", "X-Tailscale-Challenge: abc.DEF_1\r\n")
    assert got.startswith(b"HTTP/1.1 204 ")
    assert b"X-Tailscale-Response: response abc.DEF_1\r\n" in got
    bad = http_get(iroh.port, "/generate_204", "X-Tailscale-Challenge: a b\r\n")
    assert b"X-Tailscale-Response" not in bad
    assert http_get(iroh.port, "/ping").startswith(b"HTTP/1.1 200 ")
    assert http_get(iroh.port, "/elsewhere").startswith(b"HTTP/1.1 404 ")
    assert http_get(iroh.port, "/relay", "Upgrade: websocket\r\n").startswith(b"HTTP/1.1 400 ")


def test_two_nodes_exchange_packets_and_hear_when_one_leaves(iroh):
    async def scenario():
        a = await IrohClient.connect("127.0.0.1", iroh.port)
        b = await IrohClient.connect("127.0.0.1", iroh.port)
        await asyncio.sleep(0.2)  # both ClientInfos processed
        big = bytes(range(256)) * 256  # 64 KiB, the largest packet
        a.send(b.key, b"hello b")
        a.send(b.key, big)
        assert await b.packet() == (a.key, b"hello b")
        assert await b.packet() == (a.key, big)
        b.send(a.key, b"hello a")
        assert await a.packet() == (b.key, b"hello a")
        a.send_raw(frames.encode(FrameType.PING, b"8 bytes!"))
        assert await a.frame() == (FrameType.PONG, b"8 bytes!")
        await b.close()
        while (frame := await a.frame())[0] != FrameType.PEER_GONE:
            pass
        assert frame == (FrameType.PEER_GONE, b.key)
        await a.close()

    run(scenario())
    time.sleep(0.5)
    assert "forwarded 3 packets (65550 bytes); dropped 0 to absent nodes" in iroh.log()


@pytest.mark.parametrize(
    "first, why",
    [
        (frames.encode(FrameType.SEND_PACKET, b"k" * 32 + b"x"), "not ClientInfo"),
        (frames.HEADER.pack(FrameType.SEND_PACKET, 2**20), "over"),
        (None, "signature"),
        (client_info(Ed25519PrivateKey.generate(), version=2), "protocol version 2"),
    ],
)
def test_bad_first_frames_end_the_connection(iroh, first, why):
    async def scenario():
        c = await IrohClient.connect("127.0.0.1", iroh.port, hello=False)
        if first is None:
            good = bytearray(client_info(c.secret))
            good[-1] ^= 1  # message no longer matches its signature
            c.send_raw(bytes(good))
        else:
            c.send_raw(first)
        with pytest.raises((EOFError, ConnectionError)):
            while True:
                await c.frame()
        await c.close()

    run(scenario())


def test_connections_per_source_are_capped(iroh):
    async def scenario():
        held = [await IrohClient.connect("127.0.0.1", iroh.port) for _ in range(4)]
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await IrohClient.connect("127.0.0.1", iroh.port)
        # the PROXY line of the front door makes it count as the client it names
        r, w = await asyncio.open_connection("127.0.0.1", iroh.port)
        w.write(b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 443\r\n"
                b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")  # fmt: skip
        assert (await r.read()).startswith(b"HTTP/1.1 200 ")
        w.close()
        for c in held:
            await c.close()

    run(scenario())
    assert "too many iroh relay connections: 127.0.0.1" in iroh.log()


def test_a_fast_sender_is_held_to_its_rate(iroh):
    """iroh_relay_max_bps is 200 kB/s here: 1 MB takes at least 4 s (a second's
    worth goes at once); the receiver gets every packet, none dropped."""

    async def scenario() -> float:
        a = await IrohClient.connect("127.0.0.1", iroh.port)
        b = await IrohClient.connect("127.0.0.1", iroh.port)
        await asyncio.sleep(0.2)
        start = time.monotonic()
        for _ in range(100):
            a.send(b.key, b"z" * 10_000)
        for _ in range(100):
            await b.packet()
        took = time.monotonic() - start
        await a.close()
        await b.close()
        return took

    took = run(scenario())
    assert took > 3.5, f"1 MB at 200 kB/s went through in {took:.1f} s"
