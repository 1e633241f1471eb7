"""An iroh relay client (iroh 0.35's protocol) for tests and the benchmark.

It speaks what the Delta Chat core's iroh speaks: ``GET /relay`` with
``Upgrade: iroh derp http``, a signed ClientInfo, then frames.  Written from
the protocol's description in ``chatmaild.iroh.frames``, so tests can send
what the core would not (bad signatures, huge frames, floods).
"""

from __future__ import annotations

import asyncio
import collections
import ssl

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from chatmaild.iroh import frames
from chatmaild.iroh.frames import FrameType


def client_info(secret: Ed25519PrivateKey, version: int = frames.PROTOCOL_VERSION) -> bytes:
    message = bytes([version])  # postcard of {version}: a one-byte varint below 128
    public = secret.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return frames.encode(FrameType.CLIENT_INFO,
                         frames.MAGIC + public + secret.sign(message) + message)  # fmt: skip


class IrohClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 secret: Ed25519PrivateKey) -> None:  # fmt: skip
        self.reader, self.writer, self.secret = reader, writer, secret
        self.key = secret.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.frames = frames.FrameReader(limit=16 * 2**20)
        self.pending: collections.deque[tuple[int, bytes]] = collections.deque()

    @classmethod
    async def connect(cls, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                      server_name: str | None = None, hello: bool = True,
                      secret: Ed25519PrivateKey | None = None) -> IrohClient:  # fmt: skip
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=server_name if tls else None, limit=2**20
        )
        name = server_name or host
        writer.write(f"GET /relay HTTP/1.1\r\nHost: {name}\r\n"
                     f"Upgrade: {frames.UPGRADE}\r\n\r\n".encode())  # fmt: skip
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = head.split(b" ", 2)[1]
        if status != b"101":
            writer.close()
            raise ConnectionError(f"no upgrade: {head.decode(errors='replace')!r}")
        client = cls(reader, writer, secret or Ed25519PrivateKey.generate())
        if hello:
            writer.write(client_info(client.secret))
        return client

    def send(self, dst: bytes, packet: bytes) -> None:
        self.writer.write(frames.encode(FrameType.SEND_PACKET, dst + packet))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next frame from the relay; EOFError when it closed the connection."""
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise EOFError("relay closed the connection")
            self.pending.extend(self.frames.feed(data))
        return self.pending.popleft()

    async def packet(self, timeout: float = 10.0) -> tuple[bytes, bytes]:
        """The next RecvPacket's (source key, packet), answering Pings meanwhile."""
        while True:
            kind, content = await self.frame(timeout)
            if kind == FrameType.RECV_PACKET:
                return content[: frames.KEY_LEN], content[frames.KEY_LEN :]
            if kind == FrameType.PING:
                self.writer.write(frames.encode(FrameType.PONG, content))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
