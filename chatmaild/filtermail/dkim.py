"""DKIM signing and verification on top of dkimpy.

dkimpy does the header canonicalization, tag parsing, key parsing and RSA
work.  The body hash is computed here, streaming over the message buffer
(no split into lines, no canonicalized copy of a 30 MB body), and key
lookups go through an asynchronous dnspython resolver, so a slow DNS server
never blocks the event loop.  A DNS failure that may go away (timeout,
SERVFAIL) is reported as temporary, so the sender retries instead of
bouncing.

Verification accepts ``rsa-sha256`` and ``ed25519-sha256`` (RFC 8463)
signatures.  Signing uses ``relaxed/simple`` and the header sets the reference relay's
OpenDKIM used: the RFC 6376 recommended headers plus Autocrypt and
Content-Type, with the headers an attacker would like to add over-signed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import subprocess
import time
from collections import OrderedDict
from dataclasses import dataclass

import dkim as dkimpy
import dns.asyncresolver
import dns.exception
import dns.resolver
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from chatmaild.filtermail.headers import find_section

log = logging.getLogger("filtermail")

SIGNED_HEADERS = frozenset(dkimpy.DKIM.SHOULD) | {b"autocrypt", b"content-type"}
OVERSIGNED_HEADERS = (
    b"from",
    b"reply-to",
    b"subject",
    b"date",
    b"to",
    b"cc",
    b"resent-date",
    b"resent-from",
    b"resent-sender",
    b"resent-to",
    b"resent-cc",
    b"in-reply-to",
    b"references",
    b"list-id",
    b"list-help",
    b"list-unsubscribe",
    b"list-subscribe",
    b"list-post",
    b"list-owner",
    b"list-archive",
    b"autocrypt",
)
THREAD_THRESHOLD = 256 * 1024  # hash bodies above this size in a worker thread
RELAXED_CHUNK = 1024 * 1024

_WSP_EOL = re.compile(rb"[ \t]+\r\n")
_WSP = re.compile(rb"[ \t]+")


class DKIMError(Exception):
    """The message cannot be signed (bad key or headers)."""


def split_message(content: bytes | bytearray) -> tuple[bytes, int]:
    """(header block ending in CRLF, offset where the body starts), split where
    the filters' one header parser splits (HeaderError for an oversize section)."""
    section = find_section(content)
    return bytes(content[: section.header_end]), section.body_start


def _body_end(content: bytes | bytearray, start: int) -> int:
    """End of the body without trailing empty lines (keeping the last line's CRLF)."""
    end = len(content)
    while end - 2 >= start and content[end - 2 : end] == b"\r\n":
        end -= 2
    return end


def body_hash(content: bytes | bytearray, start: int, canon: bytes) -> bytes:
    """SHA-256 of the canonicalized body ``content[start:]`` (RFC 6376 3.4.3/3.4.4)."""
    view = memoryview(content)
    h = hashlib.sha256()
    if canon == b"simple":
        end = _body_end(content, start)
        # the body without trailing empty lines, then exactly one CRLF
        h.update(view[start:end])
        h.update(b"\r\n")
        return h.digest()
    # relaxed: drop trailing lines that are empty after canonicalization (only WSP),
    # then per line: trailing WSP removed, WSP runs made one SP.  Chunks end at a CRLF,
    # so every rule applies within one chunk and no more than a chunk is copied.
    end = len(content)
    while end > start and content[end - 2 : end] == b"\r\n":
        prev = content.rfind(b"\r\n", start, end - 2)
        line_start = prev + 2 if prev >= 0 else start
        if bytes(view[line_start : end - 2]).strip(b" \t"):
            break
        end = line_start
    pos = start
    while pos < end:
        cut = content.find(b"\r\n", min(pos + RELAXED_CHUNK, end) - 1, end)
        cut = end if cut < 0 else cut + 2
        h.update(_WSP.sub(b" ", _WSP_EOL.sub(b"\r\n", bytes(view[pos:cut]))))
        pos = cut
    if end > start and content[end - 2 : end] != b"\r\n":
        h.update(b"\r\n")  # a last line without CRLF gets one, as in dkimpy
    return h.digest()


async def body_hash_async(content: bytes | bytearray, start: int, canon: bytes) -> bytes:
    if len(content) - start > THREAD_THRESHOLD:
        return await asyncio.to_thread(body_hash, content, start, canon)
    return body_hash(content, start, canon)


def _parse_headers(header_block: bytes) -> dkimpy.DKIM:
    try:
        return dkimpy.DKIM(header_block + b"\r\n", logger=log, linesep=b"\r\n")
    except dkimpy.MessageFormatError as e:
        raise DKIMError(f"malformed header: {e}") from None


# ----------------------------------------------------------------- signing


class Signer:
    """Signs mail of one domain with one key (relaxed/simple, rsa-sha256).

    dkimpy canonicalizes and hashes the headers; the RSA operation runs in
    OpenSSL (``cryptography``), about 20 times faster than dkimpy's pure-Python
    modular exponentiation, which would otherwise cap a relay at ~150 msg/s.
    """

    def __init__(self, domain: str, selector: str, key_pem: bytes) -> None:
        self.domain = domain.encode("ascii")
        self.selector = selector.encode("ascii")
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise DKIMError(f"cannot parse DKIM private key: {e}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DKIMError("DKIM private key is not an RSA key")
        if key.key_size < 1024:
            raise DKIMError(f"DKIM key of {key.key_size} bits is too small")
        self.key = key

    @classmethod
    def from_file(cls, domain: str, selector: str, path: str) -> Signer:
        with open(path, "rb") as fp:
            return cls(domain, selector, fp.read())

    @staticmethod
    def header_list(d: dkimpy.DKIM) -> list[bytes]:
        names = [name.lower() for name, _ in d.headers if name.lower() in SIGNED_HEADERS]
        return names + list(OVERSIGNED_HEADERS)

    def sign_with_hash(self, header_block: bytes, bh: bytes) -> bytes:
        """The ``DKIM-Signature: ...CRLF`` line for these headers and body hash."""
        d = _parse_headers(header_block)
        include = self.header_list(d)
        policy = dkimpy.CanonicalizationPolicy.from_c_value(b"relaxed/simple")
        fields = [
            (b"v", b"1"),
            (b"a", b"rsa-sha256"),
            (b"c", b"relaxed/simple"),
            (b"d", self.domain),
            (b"s", self.selector),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(bh)),
            (b"b", b"0" * 60),  # forces b= onto its own folded line, as dkimpy does
        ]
        name = b"DKIM-Signature"
        # the signed form of our own header: folded exactly as emitted, with b= empty
        value = dkimpy.fold(b"; ".join(b"=".join(x) for x in fields), namelen=len(name))
        value = dkimpy.RE_BTAG.sub(b"\\1", value)
        h = hashlib.sha256()
        headers = policy.canonicalize_headers(d.headers)
        dkimpy.hash_headers(h, policy, headers, include, (name, b" " + value), dict(fields))
        signature = self.key.sign(h.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        fields[-1] = (b"b", base64.b64encode(signature))
        value = dkimpy.fold(b"; ".join(b"=".join(x) for x in fields) + b"\r\n", namelen=len(name))
        return name + b": " + value

    def sign(self, header_block: bytes, content: bytes | bytearray, body_start: int) -> bytes:
        return self.sign_with_hash(header_block, body_hash(content, body_start, b"simple"))

    async def sign_async(
        self, header_block: bytes, content: bytes | bytearray, body_start: int
    ) -> bytes:
        bh = await body_hash_async(content, body_start, b"simple")
        return self.sign_with_hash(header_block, bh)


# ----------------------------------------------------------------- verification


class TemporaryDNSError(Exception):
    pass


class PermanentDNSError(Exception):
    pass


def parse_resolver(spec: str) -> tuple[str, int] | None:
    """``host[:port]`` / ``[v6]:port`` -> (host, port); empty -> None (system resolver)."""
    spec = spec.strip()
    if not spec:
        return None
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
        return host, port
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return host, int(port)
    return spec, 53


def make_resolver(spec: str, timeout: float) -> dns.asyncresolver.Resolver:
    """A resolver asking the ``dns_resolver`` server ``spec`` (empty: the system's)."""
    server = parse_resolver(spec)
    if server is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [server[0]]
        resolver.port = server[1]
    resolver.timeout = min(timeout, 5.0)
    resolver.lifetime = timeout
    resolver.cache = None  # no negative caching; callers cache what they need
    return resolver


class KeyFetcher:
    """Async TXT lookups of DKIM keys with a small TTL-bound positive cache."""

    def __init__(
        self, resolver_spec: str = "", timeout: float = 10.0, cache_size: int = 1000
    ) -> None:
        self.resolver = make_resolver(resolver_spec, timeout)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def fetch(self, name: str) -> bytes:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit and hit[0] > now:
            self._cache.move_to_end(name)
            return hit[1]
        try:
            answer = await self.resolver.resolve(name, "TXT", raise_on_no_answer=True)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as e:
            raise PermanentDNSError(f"no key at {name}") from e
        except dns.resolver.NoNameservers as e:
            # every server failed (SERVFAIL/REFUSED): may be transient
            raise TemporaryDNSError(f"DNS servers failed for {name}") from e
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout) as e:
            raise TemporaryDNSError(f"DNS timeout for {name}") from e
        except dns.exception.DNSException as e:
            raise TemporaryDNSError(f"DNS error for {name}: {e}") from e
        records = []
        for rdata in list(answer)[:3]:
            raw = b"".join(rdata.strings)
            # tolerate folded records and stray quotes (seen in the wild)
            records.append(re.sub(rb'[ \t\r\n"]', b"", raw))
        record = next((r for r in records if b"p=" in r), records[0] if records else b"")
        ttl = min(max(answer.rrset.ttl if answer.rrset else 0, 0), 3600)
        if ttl:
            self._cache[name] = (now + ttl, record)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return record

    def invalidate(self, name: str) -> None:
        self._cache.pop(name, None)


@dataclass
class VerifyResult:
    ok: bool
    reply: str  # SMTP reply for a failure; "" on success
    detail: str = ""


# signature algorithm -> the key type (k=) its key record must have
KEY_TYPES = {b"rsa-sha256": "rsa", b"ed25519-sha256": "ed25519"}


def _record_tags(record: bytes) -> dict[bytes, bytes]:
    try:
        return dkimpy.util.parse_tag_value(record)
    except (dkimpy.util.InvalidTagValueList, ValueError) as e:
        raise dkimpy.KeyFormatError(f"malformed key record: {e}") from None


def key_record_type(record: bytes) -> str:
    """The k= of a DKIM key record (``rsa`` when absent, RFC 6376 3.6.1)."""
    return _record_tags(record).get(b"k", b"rsa").decode("ascii", "replace")


def ed25519_key(record: bytes) -> ed25519.Ed25519PublicKey:
    """The public key of a ``k=ed25519`` record (RFC 8463 4: p= is the raw 32-byte key)."""
    tags = _record_tags(record)
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise dkimpy.KeyFormatError("key record is not v=DKIM1")
    if not {b"*", b"email"} & set(tags.get(b"s", b"*").split(b":")):
        raise dkimpy.KeyFormatError("key record is not for email (s=)")
    if b"h" in tags and b"sha256" not in tags[b"h"].split(b":"):
        raise dkimpy.KeyFormatError("key record does not allow sha256 (h=)")
    if not tags.get(b"p"):
        raise dkimpy.KeyFormatError("key revoked (empty p=)")
    try:
        raw = base64.b64decode(tags[b"p"], validate=True)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise dkimpy.KeyFormatError(f"not an Ed25519 public key: {e}") from None


def verify_ed25519(
    d: dkimpy.DKIM,
    sig: dict[bytes, bytes],
    include: list[bytes],
    sig_header: tuple[bytes, bytes],
    record: bytes,
) -> bool:
    """RFC 8463: Ed25519 (PureEdDSA) over the SHA-256 of the canonicalized header
    fields, which are chosen and hashed exactly as for rsa-sha256 (by dkimpy).

    Done with ``cryptography`` (Debian 12's 38.0.4 has Ed25519), because
    dkimpy verifies Ed25519 only with PyNaCl installed.
    """
    key = ed25519_key(record)
    try:
        policy = dkimpy.CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    except dkimpy.InvalidCanonicalizationPolicyError as e:
        raise dkimpy.MessageFormatError(f"invalid c= value: {e}") from None
    # one more "from" than signed, as dkimpy does for RSA: an added From breaks it
    include = [*include, b"from"] if b"from" in include else list(include)
    h = hashlib.sha256()
    headers = policy.canonicalize_headers(d.headers)
    dkimpy.hash_headers(h, policy, headers, include, sig_header, sig)
    try:
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]), validate=True)
        key.verify(signature, h.digest())
    except (ValueError, InvalidSignature):
        return False
    return True


NO_SIGNATURE = "554 5.7.1 No DKIM signature found"
NO_VALID_SIGNATURE = "554 5.7.1 No valid DKIM signature found"
TEMP_FAILURE = "451 4.7.1 Temporary DNS failure while verifying DKIM signature; try again later"


class Verifier:
    """Strictly aligned DKIM verification: ``d=`` must equal the From domain exactly."""

    def __init__(self, fetcher: KeyFetcher) -> None:
        self.fetcher = fetcher

    async def verify(
        self, header_block: bytes, content: bytes | bytearray, body_start: int, from_domain: str
    ) -> VerifyResult:
        try:
            d = _parse_headers(header_block)
        except DKIMError as e:
            return VerifyResult(False, "554 5.7.1 Malformed header", str(e))
        count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
        if not count:
            return VerifyResult(False, NO_SIGNATURE)
        domain = from_domain.lower().encode("ascii", "replace")
        hashes: dict[bytes, bytes] = {}
        temporary = None
        details = []
        for idx in range(count):
            try:
                prep = d.verify_headerprep(idx)
            except dkimpy.DKIMException as e:
                details.append(f"signature {idx}: {e}")
                continue
            if not prep:
                continue
            sig, include, sigheaders = prep
            if sig[b"d"].lower() != domain:
                signer = sig[b"d"].decode(errors="replace")
                details.append(f"signature {idx}: d={signer} not aligned")
                continue
            if b"l" in sig:
                # a length limit would let anyone append content under our acceptance
                details.append(f"signature {idx}: l= tag refused")
                continue
            algorithm = sig[b"a"]
            if algorithm not in KEY_TYPES:  # rsa-sha1 is refused (RFC 8301)
                details.append(f"signature {idx}: algorithm {algorithm!r} not supported")
                continue
            canon = (sig.get(b"c", b"simple/simple").split(b"/") + [b"simple"])[1]
            if canon not in (b"simple", b"relaxed"):
                details.append(f"signature {idx}: bad c=")
                continue
            if canon not in hashes:
                hashes[canon] = await body_hash_async(content, body_start, canon)
            try:
                bh = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]), validate=True)
            except ValueError:
                bh = b""
            if bh != hashes[canon]:
                details.append(f"signature {idx}: body hash mismatch")
                continue
            name = (sig[b"s"] + b"._domainkey." + sig[b"d"]).decode("ascii", "replace")
            try:
                record = await self.fetcher.fetch(name)
            except TemporaryDNSError as e:
                temporary = str(e)
                details.append(f"signature {idx}: {e}")
                continue
            except PermanentDNSError as e:
                details.append(f"signature {idx}: {e}")
                continue
            try:
                key_type = key_record_type(record)
                if key_type != KEY_TYPES[algorithm]:
                    raise dkimpy.KeyFormatError(f"k={key_type} key for a={algorithm.decode()}")
                if key_type == "ed25519":
                    ok = verify_ed25519(d, sig, include, sigheaders[idx], record)
                else:
                    d.pk, d.keysize, d.ktag, d.seqtlsrpt = dkimpy.evaluate_pk(name, record)
                    header_sig = {k: v for k, v in sig.items() if k != b"bh"}  # bh checked above
                    ok = d.verify_sig_process(header_sig, list(include), sigheaders[idx], None)
            except dkimpy.DKIMException as e:
                ok = False
                details.append(f"signature {idx}: {e}")
            if ok:
                return VerifyResult(True, "", f"d={domain.decode()} s={sig[b's'].decode()}")
            self.fetcher.invalidate(name)
            details.append(f"signature {idx}: header signature invalid")
        detail = "; ".join(details)
        if temporary:
            return VerifyResult(False, TEMP_FAILURE, detail)
        return VerifyResult(False, NO_VALID_SIGNATURE, detail)


def _openssl(args: list[str], data: bytes | None = None) -> bytes:
    try:
        return subprocess.run(
            ["openssl", *args], input=data, capture_output=True, check=True, timeout=60
        ).stdout
    except FileNotFoundError:
        raise DKIMError("the openssl command is needed to make keys") from None
    except subprocess.CalledProcessError as e:
        raise DKIMError(f"openssl failed: {e.stderr.decode(errors='replace').strip()}") from None


def public_value(key_pem: bytes) -> bytes:
    """The DNS ``p=`` value (base64 SubjectPublicKeyInfo) of a PEM private key."""
    return base64.b64encode(_openssl(["rsa", "-pubout", "-outform", "DER"], key_pem))


def generate_key(bits: int = 2048) -> tuple[bytes, bytes]:
    """(private key PEM in PKCS#1 form, which dkimpy reads; DNS p= value)."""
    pem = _openssl(["genrsa", "-traditional", str(bits)])
    return pem, public_value(pem)


def txt_record(p_value: bytes) -> str:
    return f"v=DKIM1; k=rsa; p={p_value.decode('ascii')}"
