"""Strict checks that an ASCII-armored payload is an OpenPGP *encrypted* message.

Pure functions, no I/O.  The relay cannot decrypt anything, so "encrypted"
means: well-formed armor around a packet sequence that can only be an
encrypted message, i.e. zero or more session-key packets (PKESK, tag 1, or
SKESK, tag 3) followed by exactly one final SEIPD packet (tag 18) that ends
exactly at the end of the data.  Literal data, compressed data, signatures,
marker packets, trailing garbage and truncation are all refused.

Armor rules (RFC 4880 / RFC 9580 section 6), strict where it costs nobody:

- ``-----BEGIN PGP MESSAGE-----`` CRLF at the very start; line breaks are CRLF only;
- armor headers (``Version:``, ``Comment:``, ...) only for incoming mail (GopenPGP,
  ProtonMail and Mailvelope send them); they must be followed by the blank line;
  outgoing mail from chat clients never has them, so there they are refused;
- base64 decoded strictly: alphabet, CRLF between lines, ``=`` padding only at
  the very end, no blank lines, nothing else;
- the CRC24 line ``=XXXX`` is optional and neither its value nor its shape
  is checked: RFC 9580 (6.1) says a reader MUST NOT reject armor whose CRC is
  present, missing, malformed or wrong, and a wrong one does not make
  ciphertext any less encrypted (the recipient's integrity check, MDC/AEAD,
  catches damage).  Not computing it also saves the largest cost of checking
  a big message.  What counts as that line stays narrow, so it cannot carry
  anything: the last line before END, starting with ``=`` (no base64 line
  does), with at most 8 more base64/``=`` characters (``=AAA``, ``=3D7rkM``
  from a quoted-printable mishap) and trailing blanks.  A line of padding
  only (``=``/``==``) that completes the last base64 quantum is data;
- any number of CRLFs may follow the END line.

Packet walk: new (OpenPGP) and legacy (GnuPG) headers; legacy "indeterminate"
length is refused.  Partial body lengths are accepted only on the SEIPD packet,
and the length chain must end with a definite length.  We do *not* enforce the
RFC rule that the first partial chunk is at least 512 bytes: older Go OpenPGP
writers (GopenPGP/ProtonMail) emit smaller chunks, and the rule adds no
assurance that the content is encrypted.  The SEIPD packet must start with
version 1 (RFC 4880) or 2 (RFC 9580), PKESK with version 3 or 6, SKESK with 4
or 6.  The LibrePGP "OCB encrypted data" packet (tag 20) is refused by default
like the reference relay does: Delta Chat keys do not advertise it, so nothing
a chat client can read uses it; ``allow_aead=True`` accepts it as the final packet.
"""

from __future__ import annotations

import binascii
import re

BEGIN = b"-----BEGIN PGP MESSAGE-----"
END = b"-----END PGP MESSAGE-----"
CRLF = b"\r\n"

TAG_PKESK = 1
TAG_SKESK = 3
TAG_SEIPD = 18
TAG_AEAD = 20

# first body octet (the packet version) we accept per packet type
_VERSIONS = {TAG_PKESK: (3, 6), TAG_SKESK: (4, 6), TAG_SEIPD: (1, 2), TAG_AEAD: (1,)}

# Walking 1-byte partial chunks of a 25 MB payload would take seconds in Python;
# no real writer comes anywhere near this many headers.
MAX_HEADERS = 1 << 20
MAX_ARMOR_HEADERS = 16

# "Key: Value" armor header; values may be UTF-8 (Comment), never control chars
_ARMOR_HEADER_RE = re.compile(rb"[A-Za-z][A-Za-z0-9-]{0,63}: [^\x00-\x1f\x7f]*")
# the checksum line, well-formed (=XXXX) or not; see the module docstring
_CRC_LINE_RE = re.compile(rb"=[A-Za-z0-9+/=]{0,8}[ \t]{0,8}")
_PADDING_LINE_RE = re.compile(rb"={1,2}")


# --- packets ----------------------------------------------------------------


def packet_problem(data: bytes, *, allow_aead: bool = False) -> str | None:
    """Why ``data`` is not an encrypted OpenPGP message, or None if it is one."""
    try:
        return _packet_problem(memoryview(data), allow_aead)
    except Exception as exc:  # never let hostile input escape as an exception
        return f"packet walk failed: {type(exc).__name__}"


def _packet_problem(data: memoryview, allow_aead: bool) -> str | None:
    end = len(data)
    if end == 0:
        return "empty payload"
    final_tags = (TAG_SEIPD, TAG_AEAD) if allow_aead else (TAG_SEIPD,)
    pos = 0
    headers = 0
    while True:
        first = data[pos]
        if not first & 0x80:
            return f"byte {pos}: not a packet header"
        new_format = bool(first & 0x40)
        tag = first & 0x3F if new_format else (first >> 2) & 0x0F
        if tag not in _VERSIONS or (tag == TAG_AEAD and not allow_aead):
            return f"packet type {tag} not allowed"
        pos += 1
        vpos = -1  # offset of the first body byte (the packet's version octet)
        if new_format:
            # length chain: any partial chunks (224..254), then one definite length
            while True:
                headers += 1
                if headers > MAX_HEADERS:
                    return "too many packet/chunk headers"
                if pos >= end:
                    return "truncated length"
                o1 = data[pos]
                if o1 < 192:
                    length, pos = o1, pos + 1
                elif o1 < 224:
                    if pos + 2 > end:
                        return "truncated length"
                    length, pos = ((o1 - 192) << 8) + data[pos + 1] + 192, pos + 2
                elif o1 == 255:
                    if pos + 5 > end:
                        return "truncated length"
                    length, pos = int.from_bytes(data[pos + 1 : pos + 5], "big"), pos + 5
                else:
                    if tag not in final_tags:
                        return f"partial length on packet type {tag}"
                    pos += 1
                    if vpos < 0:
                        vpos = pos
                    pos += 1 << (o1 & 0x1F)
                    if pos > end:
                        return "truncated packet"
                    continue
                break
        else:  # legacy format (GnuPG)
            headers += 1
            if headers > MAX_HEADERS:
                return "too many packet/chunk headers"
            ltype = first & 0x03
            if ltype == 3:
                return "indeterminate length"
            nlen = 1 << ltype
            if pos + nlen > end:
                return "truncated length"
            length = int.from_bytes(data[pos : pos + nlen], "big")
            pos += nlen
        if vpos < 0:
            if length == 0:
                return f"packet type {tag} has an empty body"
            vpos = pos
        pos += length
        if pos > end:
            return "truncated packet"
        if data[vpos] not in _VERSIONS[tag]:
            return f"packet type {tag} version {data[vpos]} not allowed"
        if pos == end:
            if tag in final_tags:
                return None
            return f"last packet is type {tag}, not encrypted data"
        if tag not in (TAG_PKESK, TAG_SKESK):
            return f"packet type {tag} before the end"


def check_openpgp_packets(data: bytes, *, allow_aead: bool = False) -> bool:
    """True if ``data`` is PKESK/SKESK packets followed by exactly one final SEIPD."""
    return packet_problem(data, allow_aead=allow_aead) is None


# --- armor ------------------------------------------------------------------


_B64_AND_CRLF = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"


def dearmor(
    text: str | bytes | bytearray, outgoing: bool, *, start: int = 0, end: int | None = None
) -> tuple[bytes | None, str | None]:
    """Strictly decode an armored PGP MESSAGE: ``(binary, None)`` or ``(None, reason)``.

    ``start``/``end`` select the armored text inside a larger buffer (a MIME
    part inside the whole message), so a 25 MB payload is not copied before
    it is decoded.
    """
    try:
        if isinstance(text, str):
            try:
                text = text.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                return None, "not encodable text"
        elif not isinstance(text, bytes | bytearray):
            text = bytes(text)
        stop = len(text) if end is None else max(0, min(end, len(text)))
        return _dearmor(text, max(0, start), stop, outgoing)
    except Exception as exc:  # never let hostile input escape as an exception
        return None, f"armor parse failed: {type(exc).__name__}"


def _dearmor(
    buf: bytes | bytearray, start: int, end: int, outgoing: bool
) -> tuple[bytes | None, str | None]:
    if not buf.startswith(BEGIN + CRLF, start, end):
        return None, "does not start with BEGIN PGP MESSAGE line"
    while end - start >= 2 and buf[end - 2] == 0x0D and buf[end - 1] == 0x0A:
        end -= 2
    pos = start + len(BEGIN) + 2
    if end - pos < len(END) or not buf.endswith(CRLF + END, pos - 2, end):
        return None, "does not end with END PGP MESSAGE line"
    stop = end - len(END)  # just after the CRLF ending the last line before END

    # armor headers, then the blank line
    nheaders = 0
    while True:
        eol = buf.find(CRLF, pos, stop)
        if eol < 0:
            return None, "no payload"
        if eol == pos:  # the blank line that ends the (possibly empty) header block
            pos += 2
            break
        if buf.find(b":", pos, eol) < 0:
            if nheaders:
                return None, "missing blank line after armor headers"
            # No blank line at all: RFC-invalid, but unambiguous (base64 has no
            # colon) and the reference relay accepts it, so we do too.
            break
        if outgoing:
            return None, "armor header in outgoing message"
        if not _ARMOR_HEADER_RE.fullmatch(buf, pos, eol):
            return None, "malformed armor header"
        nheaders += 1
        if nheaders > MAX_ARMOR_HEADERS:
            return None, "too many armor headers"
        pos = eol + 2

    # optional CRC24 line (not verified, shape not checked): the last line before END
    dend = stop - 2  # the base64 lines are buf[pos:dend], joined by CRLF
    last = buf.rfind(CRLF, pos - 2, dend) + 2
    if last >= pos and _CRC_LINE_RE.fullmatch(buf, last, dend):
        problem = _base64_problem(buf, pos, last - 2)
        if problem is not None and _PADDING_LINE_RE.fullmatch(buf, last, dend):
            problem = _base64_problem(buf, pos, dend)  # padding that wrapped onto its own line
        else:
            dend = last - 2
    else:
        problem = _base64_problem(buf, pos, dend)
    if problem is not None:
        return None, problem
    # the non-strict decoder skips the (validated) CRLFs; nothing else is left to skip
    binary = binascii.a2b_base64(memoryview(buf)[pos:dend])
    if not binary:
        return None, "no payload"
    return binary, None


def _base64_problem(buf: bytes | bytearray, pos: int, dend: int) -> str | None:
    """Why ``buf[pos:dend]`` is not strict base64 in CRLF-separated lines, without copying."""
    if dend <= pos:
        return "no payload"
    # only alphabet, "=" and CRLF ...
    junk = len(buf.translate(None, _B64_AND_CRLF))
    junk_outside = len(buf[:pos].translate(None, _B64_AND_CRLF))
    junk_outside += len(buf[dend:].translate(None, _B64_AND_CRLF))
    if junk != junk_outside:
        return "invalid base64: character outside the alphabet"
    # ... CR and LF only as CRLF pairs, no blank lines ...
    ncrlf = buf.count(CRLF, pos, dend)
    if buf.count(b"\r", pos, dend) != ncrlf or buf.count(b"\n", pos, dend) != ncrlf:
        return "invalid base64: bare CR or LF"
    if buf.startswith(CRLF, pos, dend) or buf.endswith(CRLF, pos, dend):
        return "blank line inside base64"
    if buf.find(CRLF + CRLF, pos, dend) >= 0:
        return "blank line inside base64"
    # ... and "=" padding only at the very end, completing the last quantum.
    npad = buf.count(b"=", pos, dend)
    if npad and (npad > 2 or buf.find(b"=", pos, dend) != dend - npad):
        return "invalid base64: misplaced padding"
    nchars = dend - pos - 2 * ncrlf - npad
    if (nchars + npad) % 4 or (npad and nchars % 4 != 4 - npad):
        return "invalid base64: incorrect length or padding"
    return None


def armor_problem(
    text: str | bytes | bytearray,
    outgoing: bool,
    *,
    allow_aead: bool = False,
    start: int = 0,
    end: int | None = None,
) -> str | None:
    """Why ``text`` (or ``text[start:end]``) is not an acceptable armored encrypted
    message, or None if it is one."""
    binary, problem = dearmor(text, outgoing, start=start, end=end)
    if problem is not None:
        return problem
    return packet_problem(binary, allow_aead=allow_aead)


def check_armored_payload(text: str | bytes, outgoing: bool, *, allow_aead: bool = False) -> bool:
    """True if ``text`` is a strictly armored encrypted OpenPGP message.

    ``outgoing`` refuses armor headers such as ``Version:``.
    """
    return armor_problem(text, outgoing, allow_aead=allow_aead) is None
