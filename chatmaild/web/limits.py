"""Admission control for the public web port: who may open a connection, start a TLS
handshake or get credentials, and one log line per kind of refusal per minute.

Clients are counted per *source*: an IPv4 address, or the /64 network of an IPv6
address (one household or phone gets a /64, and it can pick any address in it).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field

from chatmaild.common.logsummary import SummaryLog as RefusalLog
from chatmaild.common.ratelimit import RateLimiter

__all__ = [
    "TOO_MANY_HANDSHAKES",
    "Admission",
    "RefusalLog",
    "SourceBudget",
    "mail_budget",
    "source_of",
]


def source_of(ip: str) -> str:
    """The key a client is counted under: its IPv4 address or its IPv6 /64."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass
class SourceBudget:
    """Things held at once, in all and per source (connections, tunnels, uploads):
    ``take`` counts one or says why not, ``give`` hands it back."""

    limit: int
    per_source_limit: int
    full: str  # the refusal when ``limit`` is reached
    crowded: str  # the refusal when the source's share is
    held: int = 0
    per_source: Counter[str] = field(default_factory=Counter)

    def take(self, source: str) -> str | None:
        if self.held >= self.limit:
            return self.full
        if self.per_source[source] >= self.per_source_limit:
            return self.crowded
        self.held += 1
        self.per_source[source] += 1
        return None

    def give(self, source: str) -> None:
        self.held -= 1
        self.per_source[source] -= 1
        if self.per_source[source] <= 0:
            del self.per_source[source]


TOO_MANY_HANDSHAKES = "too many TLS handshakes in progress"


def mail_budget(limit: int, per_source_limit: int) -> SourceBudget:
    """IMAP/SMTP connections passed on to Dovecot or Postfix, in all and per source."""
    return SourceBudget(limit, per_source_limit, "mail connection limit reached",
                        "too many mail connections")  # fmt: skip


@dataclass
class Admission:
    """Connections open in total and per source; TLS handshakes in progress and their
    rate per source.  The server asks before each step and reports each end."""

    max_connections: int = 1024
    max_per_source: int = 32
    max_handshakes: int = 64
    handshakes_per_minute: int = 600
    handshake_burst: int = 20
    # port 443's mail tunnels (IMAP IDLE lasts hours): their own budget, not the pages'
    max_tunnels: int = 4096
    max_tunnels_per_source: int = 256
    handshaking: int = 0
    connections: SourceBudget = field(init=False)
    # given: one budget of mail connections shared with another server (port 443's
    # tunnels and port 993's IMAP front hold the same descriptors)
    tunnels: SourceBudget | None = None
    handshakes: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.connections = SourceBudget(
            self.max_connections,
            self.max_per_source,
            "connection limit reached",
            "too many connections",
        )
        if self.tunnels is None:
            self.tunnels = mail_budget(self.max_tunnels, self.max_tunnels_per_source)
        self.handshakes = RateLimiter(self.handshakes_per_minute, self.handshake_burst)

    def connect(self, source: str) -> str | None:
        """Count a new connection; or why it is refused."""
        return self.connections.take(source)

    def disconnect(self, source: str) -> None:
        self.connections.give(source)

    def start_handshake(self, source: str) -> str | None:
        if self.handshaking >= self.max_handshakes:
            return TOO_MANY_HANDSHAKES
        if self.handshakes.check(source):
            return "TLS handshakes too fast"
        self.handshaking += 1
        return None

    def end_handshake(self) -> None:
        self.handshaking -= 1

    def open_tunnel(self, source: str) -> str | None:
        """Count a connection that became a mail tunnel; or why it is refused."""
        assert self.tunnels is not None
        return self.tunnels.take(source)

    def close_tunnel(self, source: str) -> None:
        assert self.tunnels is not None
        self.tunnels.give(source)
