"""The iroh relay protocol's frames, as iroh 0.35 speaks it (Delta Chat core 2.x).

After ``GET /relay`` with ``Upgrade: iroh derp http`` and the answer 101, both
sides send frames: one type byte, a 4-byte big-endian length, the content.  The
client's first frame is ClientInfo: a magic string, its ed25519 public key (the
node id), a signature and the signed message (postcard of ``{version: 3}``).
A SendPacket names the destination's key; the relay passes the packet on as a
RecvPacket naming the source's.  Nothing here does I/O.
"""

from __future__ import annotations

import enum
import struct

UPGRADE = "iroh derp http"
PROTOCOL_VERSION = 3
MAGIC = "RELAY🔑".encode()
KEY_LEN = 32
SIGNATURE_LEN = 64
HEADER = struct.Struct(">BI")
MAX_PACKET = 64 * 1024  # iroh's MAX_PACKET_SIZE
# the longest frame a client may send: a SendPacket of MAX_PACKET (iroh allows 1 MiB
# of any frame; only packets are long, and we refuse the rest early)
MAX_CLIENT_FRAME = KEY_LEN + MAX_PACKET
MAX_CLIENT_INFO = len(MAGIC) + KEY_LEN + SIGNATURE_LEN + 256


class FrameType(enum.IntEnum):
    CLIENT_INFO = 2
    SEND_PACKET = 4
    RECV_PACKET = 5
    KEEP_ALIVE = 6
    NOTE_PREFERRED = 7
    PEER_GONE = 8
    PING = 12
    PONG = 13
    HEALTH = 14
    RESTARTING = 15


class FrameError(ValueError):
    """The peer broke the protocol: the connection ends."""


def encode(kind: int, content: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(content)) + content


def recv_packet(src_key: bytes, packet: bytes) -> bytes:
    return HEADER.pack(FrameType.RECV_PACKET, KEY_LEN + len(packet)) + src_key + packet


class FrameReader:
    """Splits a byte stream into (type, content) frames, refusing over-long ones
    before their content arrives."""

    __slots__ = ("buf", "limit")

    def __init__(self, limit: int = MAX_CLIENT_FRAME) -> None:
        self.buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Every frame complete so far."""
        self.push(data)
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    def push(self, data: bytes) -> None:
        self.buf += data

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next complete frame, or None until more data arrives."""
        if len(self.buf) < HEADER.size:
            return None
        kind, length = HEADER.unpack_from(self.buf)
        if length > self.limit:
            raise FrameError(f"frame of {length} bytes (type {kind}), over {self.limit}")
        end = HEADER.size + length
        if end > len(self.buf):
            return None
        content = bytes(self.buf[HEADER.size : end])
        del self.buf[:end]
        return kind, content

    @property
    def pending(self) -> int:
        return len(self.buf)


def _varint(data: bytes) -> tuple[int, int]:
    """postcard's unsigned LEB128 varint: (value, bytes used)."""
    value = shift = 0
    for i, byte in enumerate(data[:10]):
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise FrameError("bad varint in ClientInfo")


def client_info(content: bytes) -> tuple[bytes, int]:
    """The node key and protocol version of a ClientInfo frame's content, its
    signature checked; FrameError otherwise."""
    fixed = len(MAGIC) + KEY_LEN + SIGNATURE_LEN
    if len(content) < fixed + 1 or len(content) > MAX_CLIENT_INFO:
        raise FrameError(f"ClientInfo of {len(content)} bytes")
    if not content.startswith(MAGIC):
        raise FrameError("ClientInfo without the magic")
    key = content[len(MAGIC) : len(MAGIC) + KEY_LEN]
    signature = content[len(MAGIC) + KEY_LEN : fixed]
    message = content[fixed:]
    # imported at the first client, not with the web process: 3 to 8 MB of RSS
    # (Debian 12 / 13) that a relay whose apps never go realtime does not pay
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
    except (InvalidSignature, ValueError) as e:
        raise FrameError("ClientInfo signature does not verify") from e
    version, _ = _varint(message)
    return key, version


def send_packet(content: bytes) -> tuple[bytes, bytes]:
    """(destination key, packet) of a SendPacket frame's content."""
    if len(content) < KEY_LEN:
        raise FrameError(f"SendPacket of {len(content)} bytes")
    return content[:KEY_LEN], content[KEY_LEN:]
