"""Mail connections the web process passes on to Dovecot or Postfix.

Port 443's: a connection whose ClientHello asks for ``imap`` or ``smtp`` is passed
on, bytes unchanged, to Dovecot's or Postfix's implicit-TLS listener for port 443
(their TLS, certificate, limits and logs), after a PROXY protocol v1 line that
tells them the client's address (README, "Port 443").

Port 993's (the IMAP front): the TLS ends here and Dovecot gets the plaintext after
a PROXY protocol v2 header with the client's address and an SSL entry, which makes
Dovecot treat the connection as TLS-secured (README, "Idle devices").
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _plain(ip: str) -> IPAddress:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _addresses(client: tuple[str, int], server: tuple[str, int]) -> tuple[IPAddress, IPAddress]:
    """The client's and the server's address, of one family as PROXY headers need."""
    src, dst = _plain(client[0]), _plain(server[0])
    if src.version != dst.version:  # an IPv4 client on an IPv6 socket, unmapped above
        dst = ipaddress.ip_address("127.0.0.1" if src.version == 4 else "::1")
    return src, dst


def proxy_v1(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """The PROXY v1 line naming ``client`` and the address it connected to."""
    src, dst = _addresses(client, server)
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {client[1]} {server[1]}\r\n".encode()


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_CLIENT_SSL = 0x01


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def proxy_v2(client: tuple[str, int], server: tuple[str, int], tls_version: str) -> bytes:
    """The PROXY v2 header naming ``client``, the address it connected to, and that
    its TLS (``tls_version``) was ended by us: Dovecot's haproxy listener then
    counts the connection as secured (``PP2_CLIENT_SSL``; verify 0: no client
    certificate was asked for)."""
    src, dst = _addresses(client, server)
    family = 0x11 if src.version == 4 else 0x21  # TCP over IPv4 / IPv6
    addresses = src.packed + dst.packed + struct.pack("!HH", client[1], server[1])
    ssl_entry = struct.pack("!BI", PP2_CLIENT_SSL, 0) + _tlv(
        PP2_SUBTYPE_SSL_VERSION, tls_version.encode("ascii", "replace")
    )
    body = addresses + _tlv(PP2_TYPE_SSL, ssl_entry)
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


class ClientSide(Protocol):
    """What the backend needs of the client's connection."""

    def backend_data(self, data: bytes) -> None: ...
    def backend_lost(self) -> None: ...
    def backend_paused(self, paused: bool) -> None: ...


class Backend(asyncio.Protocol):
    """The mail server's end of a tunnel: what it sends goes to the client as it is."""

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.backend_data(data)

    def eof_received(self) -> bool:
        return False  # close: the client's end follows in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client.backend_lost()

    def pause_writing(self) -> None:
        self.client.backend_paused(True)  # the server is slow to read: so is the client

    def resume_writing(self) -> None:
        self.client.backend_paused(False)
