"""The ALPN protocols a TLS ClientHello offers, read from the raw bytes (no I/O).

Port 443 serves three protocols by ALPN (README, "Port 443"): the web process
reads the client's first bytes, and this module says whether they hold a whole
ClientHello yet and which protocol names it offers.  Anything that is not a
well-formed ClientHello offers nothing: it goes to the web server's own TLS,
which refuses it with a handshake error.
"""

from __future__ import annotations

# a ClientHello may span several TLS records; more than this is not one we serve
MAX_HELLO = 32 * 1024
RECORD_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXTENSION_ALPN = 16


class NeedMore(Exception):
    """The bytes so far end inside the ClientHello."""


def offered_alpn(data: bytes) -> tuple[str, ...] | None:
    """ALPN names of the ClientHello at the start of ``data`` (``()``: none offered or
    not a ClientHello); None while ``data`` ends before the ClientHello does."""
    try:
        return _alpn(_hello(data))
    except NeedMore:
        return None
    except (IndexError, ValueError):
        return ()


def _hello(data: bytes) -> bytes:
    """The ClientHello message body, joined from the handshake records it spans."""
    fragments = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            if len(data) >= MAX_HELLO:
                raise ValueError("too long")
            raise NeedMore
        if data[pos] != RECORD_HANDSHAKE or data[pos + 1] != 3:
            raise ValueError("not a TLS handshake record")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0:
            raise ValueError("empty record")
        end = pos + 5 + length
        if end > MAX_HELLO + 5:
            raise ValueError("too long")
        if len(data) < end:
            raise NeedMore
        fragments += data[pos + 5 : end]
        pos = end
        if len(fragments) >= 4:
            if fragments[0] != HANDSHAKE_CLIENT_HELLO:
                raise ValueError("not a ClientHello")
            body = int.from_bytes(fragments[1:4], "big")
            if body > MAX_HELLO:
                raise ValueError("too long")
            if len(fragments) >= 4 + body:
                return bytes(fragments[4 : 4 + body])


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, size: int) -> bytes:
        return self.take(self.number(size))

    def done(self) -> bool:
        return self.pos == len(self.data)


def _alpn(hello: bytes) -> tuple[str, ...]:
    r = _Reader(hello)
    r.take(2 + 32)  # legacy version, random
    r.vector(1)  # session id
    r.vector(2)  # cipher suites
    r.vector(1)  # compression methods
    if r.done():
        return ()  # no extensions at all
    extensions = _Reader(r.vector(2))
    while not extensions.done():
        kind = extensions.number(2)
        payload = extensions.vector(2)
        if kind != EXTENSION_ALPN:
            continue
        names = _Reader(payload)
        names = _Reader(names.vector(2))
        found = []
        while not names.done():
            name = names.vector(1)
            if not name:
                raise ValueError("empty protocol name")
            found.append(name.decode("ascii", "replace"))
        return tuple(found)
    return ()
