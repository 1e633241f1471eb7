"""Who is connected to the iroh relay, and passing packets between them (no I/O).

A node is known by its ed25519 key.  A packet for a node that is not connected
is dropped (the sender's iroh tries other paths); a node whose send queue is full
loses the packet too ("busy"), as in iroh's own relay.  When a node leaves,
every node it sent to hears PeerGone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from chatmaild.iroh import frames


class Node(Protocol):
    key: bytes

    def deliver(self, frame: bytes) -> bool:
        """Queue a frame for the node; False: its queue is full, dropped."""
        ...

    def replaced(self) -> None:
        """Another connection took this node's key: end this one."""
        ...


@dataclass
class Counters:
    packets: int = 0  # forwarded
    bytes: int = 0
    no_peer: int = 0  # dropped: destination not connected
    busy: int = 0  # dropped: destination's queue full

    def line(self, nodes: int) -> str:
        return (
            f"forwarded {self.packets} packets ({self.bytes} bytes); dropped"
            f" {self.no_peer} to absent nodes, {self.busy} to busy ones; {nodes} nodes"
        )


@dataclass
class Hub:
    nodes: dict[bytes, Node] = field(default_factory=dict)
    sent_to: dict[bytes, set[bytes]] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)

    def register(self, node: Node) -> None:
        old = self.nodes.get(node.key)
        self.nodes[node.key] = node
        if old is not None and old is not node:
            old.replaced()

    def unregister(self, node: Node) -> None:
        if self.nodes.get(node.key) is not node:
            return  # replaced already: the newer connection stays
        del self.nodes[node.key]
        gone = frames.encode(frames.FrameType.PEER_GONE, node.key)
        for dst in self.sent_to.pop(node.key, ()):
            peer = self.nodes.get(dst)
            if peer is not None:
                peer.deliver(gone)

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        peer = self.nodes.get(dst)
        if peer is None:
            self.counters.no_peer += 1
            return False
        if not peer.deliver(frames.recv_packet(src, packet)):
            self.counters.busy += 1
            return False
        sent = self.sent_to.setdefault(src, set())
        if len(sent) < 4096:  # bounded: a node cannot grow this without end
            sent.add(dst)
        self.counters.packets += 1
        self.counters.bytes += len(packet)
        return True
