"""TURN for calls (issue 22): Debian's coturn, started and configured by the relay.

The relay and this module live in a network namespace of their own
(testing.netns), joined by a veth pair to a second one for the call's far
ends: the relay's side is 203.0.113.1 (the relay's own address, which coturn
relays from), the peers' side 203.0.113.2 (a peer coturn may reach) and
10.9.9.9 (a private address it must not).  The real Delta Chat core learns
the TURN server from the IMAP METADATA key; a real TURN client (aioice, from
Debian) allocates with those credentials and relays UDP to a peer and back;
wrong and expired credentials, and peers at loopback, at the relay's own
address and at a private address are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

import pytest
from aioice import stun
from aioice.turn import TurnClientUdpProtocol

from chatmaild.common.turn import credentials
from testing.netns import far_network, far_socket, private_network
from tests.fixtures.relay import RelayPool

pytestmark = [pytest.mark.relay, pytest.mark.timeout(300)]

RELAY_SIDE = "203.0.113.1"  # TEST-NET-3: never a real machine's
PEER_SIDE = "203.0.113.2"
PRIVATE_PEER = "10.9.9.9"


@pytest.fixture(scope="module")
def peers_netns():
    """This module's network, and the name of the peers' namespace."""
    with private_network(), far_network(f"chatmaild-peers-{os.getpid()}", RELAY_SIDE,
                     (PEER_SIDE, PRIVATE_PEER)) as name:  # fmt: skip
        yield name


@pytest.fixture(scope="module")
def relay(peers_netns):
    pool = RelayPool()
    try:
        components = ("postfix", "dovecot", "doveauth", "lastlogin", "metadata", "turn")
        overrides = {"mail_domain": "127.0.0.1", "turn_relay_ip": RELAY_SIDE}
        yield pool(overrides, components)
    finally:
        pool.close()


@pytest.fixture(scope="module")
def dc(relay):
    # started inside the module's network namespace (a child inherits it)
    from testing.dcclient import DCClients

    workdir = relay.state_dir.parent / f"dc-{os.getpid()}"
    c = DCClients(workdir)
    yield c
    c.close()


def peer_socket(netns: str, address: str) -> socket.socket:
    sock = far_socket(netns, address)
    sock.settimeout(10)
    return sock


class Received:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.queue.put_nowait((data, addr))


async def allocate(server: tuple[str, int], user: str, password: str) -> TurnClientUdpProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: TurnClientUdpProtocol(server, user, password, 600, 300), remote_addr=server
    )
    await proto.connect()
    return proto


def refused_code(coro) -> int | None:
    """The STUN error code a request got, or None if it succeeded."""
    try:
        asyncio.get_event_loop().run_until_complete(coro)
    except stun.TransactionFailed as e:
        return e.response.attributes["ERROR-CODE"][0]
    return None


@pytest.fixture(scope="module")
def ice(relay, dc):
    """The TURN server the core got from the relay: (host, port), user, password."""
    account = dc.account(relay)
    servers = account.ice_servers()
    [turn] = [s for s in servers if any(u.startswith("turn:") for u in s["urls"])]
    host, port = turn["urls"][0].removeprefix("turn:").rsplit(":", 1)
    return (host, int(port)), turn["username"], turn["credential"]


def test_the_core_gets_our_turn_server_with_fresh_credentials(relay, ice):
    server, user, password = ice
    assert server == ("127.0.0.1", relay.config.turn_port)
    # valid for turn_credentials_ttl: longer than the 12 hours before expiry when the
    # core asks again, bounded all the same
    assert 12 * 3600 < int(user) - time.time() <= relay.config.turn_credentials_ttl


def test_relays_udp_between_a_client_and_a_peer(relay, ice, peers_netns):
    server, user, password = ice
    peer = peer_socket(peers_netns, PEER_SIDE)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        proto = loop.run_until_complete(allocate(server, user, password))
        assert proto.relayed_address[0] == RELAY_SIDE
        received = Received()
        proto.receiver = received
        loop.run_until_complete(proto.send_data(b"ring ring", peer.getsockname()))
        data, relayed_from = peer.recvfrom(2048)
        assert data == b"ring ring" and relayed_from == proto.relayed_address
        peer.sendto(b"hello back", relayed_from)
        data, _ = loop.run_until_complete(asyncio.wait_for(received.queue.get(), 10))
        assert data == b"hello back"
        loop.run_until_complete(proto.delete())
    finally:
        peer.close()
        loop.close()


@pytest.mark.parametrize(
    "target", ["127.0.0.1", RELAY_SIDE, PRIVATE_PEER], ids=["loopback", "own", "private"]
)
def test_no_relaying_into_the_relays_own_network(relay, ice, target):
    server, user, password = ice
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        proto = loop.run_until_complete(allocate(server, user, password))
        assert refused_code(proto.channel_bind(0x4000, (target, 9))) == 403
        loop.run_until_complete(proto.delete())
    finally:
        loop.close()


def test_wrong_and_expired_credentials_are_refused(relay, ice):
    server, user, _ = ice
    secret = (relay.state_dir / "etc/turn.secret").read_text().strip()
    expired_user, expired_password = credentials(secret, time.time() - 7200, 3600)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        assert refused_code(allocate(server, user, "not-the-password")) == 401
        assert refused_code(allocate(server, expired_user, expired_password)) == 401
        # the same secret makes working ones: the refusals are not about anything else
        fresh_user, fresh_password = credentials(secret, time.time(), 3600)
        proto = loop.run_until_complete(allocate(server, fresh_user, fresh_password))
        with contextlib.suppress(Exception):
            loop.run_until_complete(proto.delete())
    finally:
        loop.close()
