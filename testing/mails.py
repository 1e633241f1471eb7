"""Test messages for filtermail tests and benchmarks (CRLF, as sent over SMTP).

The encrypted ones are structurally real PGP/MIME: a PKESK packet and one
SEIPD packet of random bytes in strict armor with CRC, the shape a chat
client sends.  Nobody can decrypt them, and the relay does not need to.
"""

from __future__ import annotations

import base64
import email.utils
import os

from chatmaild.filtermail import pgp


def _packet(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 192:
        length = bytes([n])
    elif n < 8384:
        n2 = n - 192
        length = bytes([(n2 >> 8) + 192, n2 & 0xFF])
    else:
        length = b"\xff" + n.to_bytes(4, "big")
    return bytes([0xC0 | tag]) + length + body


def _crc24_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 16
        for _ in range(8):
            r = (r << 1) ^ (0x1864CFB if r & 0x800000 else 0)
        table.append(r & 0xFFFFFF)
    return table


_CRC24_TABLE = _crc24_table()


def crc24(data: bytes) -> int:
    """The armor checksum of RFC 4880 6.1 (filtermail does not verify it; writers may add it)."""
    crc = 0xB704CE
    for b in data:
        crc = ((crc << 8) & 0xFFFFFF) ^ _CRC24_TABLE[(crc >> 16) ^ b]
    return crc


def armor(
    binary: bytes, headers: tuple[bytes, ...] = (), crc: bool = True, width: int = 64
) -> bytes:
    """``binary`` in ASCII armor with CRLF line ends, optionally with armor headers and CRC."""
    b64 = base64.b64encode(binary)
    lines = [b64[i : i + width] for i in range(0, len(b64), width)]
    out = [pgp.BEGIN, *headers, b"", *lines]
    if crc:
        out.append(b"=" + base64.b64encode(crc24(binary).to_bytes(3, "big")))
    out.append(pgp.END)
    return b"\r\n".join(out) + b"\r\n"


def armored_payload(size: int) -> bytes:
    binary = _packet(1, b"\x03" + os.urandom(8) + b"\x12" + os.urandom(80))
    binary += _packet(18, b"\x01" + os.urandom(max(size, 16)))
    return armor(binary, width=76)


def _headers(from_addr: str, to_addrs: list[str], subject: str, extra: list[str]) -> list[str]:
    return [
        f"From: <{from_addr}>",
        f"To: {', '.join(f'<{a}>' for a in to_addrs)}",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: {email.utils.make_msgid(domain=from_addr.rpartition('@')[2].strip('[]'))}",
        "MIME-Version: 1.0",
        *extra,
    ]


def encrypted_message(
    from_addr: str,
    to_addrs: list[str],
    size: int = 4096,
    subject: str = "...",
    extra_headers: tuple[str, ...] = (),
) -> bytes:
    """A PGP/MIME message of roughly ``size`` bytes."""
    boundary = "bnd" + os.urandom(8).hex()
    headers = _headers(
        from_addr,
        to_addrs,
        subject,
        [
            *extra_headers,
            f'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
            f'boundary="{boundary}"',
        ],
    )
    payload_size = max(16, size * 3 // 4 - 600)
    body = (
        (
            f"--{boundary}\r\n"
            "Content-Type: application/pgp-encrypted\r\n"
            "Content-Description: PGP/MIME version identification\r\n\r\n"
            "Version: 1\r\n\r\n"
            f"--{boundary}\r\n"
            'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
            "Content-Description: OpenPGP encrypted message\r\n"
            'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n'
        ).encode()
        + armored_payload(payload_size)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + body


def plain_message(
    from_addr: str, to_addrs: list[str], text: str = "Hello!", subject: str = "hi"
) -> bytes:
    headers = _headers(from_addr, to_addrs, subject, ["Content-Type: text/plain; charset=utf-8"])
    body = text.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + body.encode()


def securejoin_message(from_addr: str, to_addr: str, step: str = "vc-request") -> bytes:
    boundary = "sj" + os.urandom(6).hex()
    headers = _headers(
        from_addr,
        [to_addr],
        f"Message from {from_addr}",
        [
            f"Secure-Join: {step}",
            "Secure-Join-Invitenumber: abcdefghijk",
            f'Content-Type: multipart/mixed; boundary="{boundary}"',
        ],
    )
    body = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Secure-Join: {step}\r\n--{boundary}--\r\n"
    )
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + body.encode()
