"""What a PEM certificate covers and when it should be renewed (no I/O)."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, NameOID

# renew when a third of the lifetime is left: 30 days of Let's Encrypt's 90, 2 of
# its 6-day certificates, and proportionally for pebble's short test certificates
RENEW_FRACTION = 1 / 3


@dataclass(frozen=True)
class CertInfo:
    names: frozenset[str]  # DNS names and IP addresses of subjectAltName
    not_before: datetime.datetime
    not_after: datetime.datetime
    self_signed: bool
    issuer: str
    fingerprint: str  # sha256 of the leaf's DER

    @property
    def lifetime(self) -> datetime.timedelta:
        return self.not_after - self.not_before

    def renew_at(self) -> datetime.datetime:
        return self.not_after - self.lifetime * RENEW_FRACTION

    def covers(self, names: tuple[str, ...] | frozenset[str]) -> bool:
        return set(names) <= self.names


def parse_pem(pem: bytes) -> CertInfo:
    """The first (leaf) certificate of ``pem``; ValueError if there is none."""
    cert = x509.load_pem_x509_certificate(pem)
    names: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        pass
    else:
        names.update(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
        names.update(str(ip) for ip in san.value.get_values_for_type(x509.IPAddress))
    cns = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = str(cns[0].value) if cns else cert.issuer.rfc4514_string()
    return CertInfo(
        names=frozenset(names),
        not_before=_utc(cert, "not_valid_before"),
        not_after=_utc(cert, "not_valid_after"),
        self_signed=cert.issuer == cert.subject,
        issuer=issuer,
        fingerprint=hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
    )


def _utc(cert: x509.Certificate, field: str) -> datetime.datetime:
    # *_utc since cryptography 42 (Debian 13); Debian 12's 38 has the naive UTC ones only
    aware = getattr(cert, f"{field}_utc", None)
    if aware is not None:
        return aware
    return getattr(cert, field).replace(tzinfo=datetime.UTC)


def renewal_reason(
    info: CertInfo | None, names: tuple[str, ...], now: datetime.datetime
) -> str | None:
    """Why a certificate for ``names`` must be requested now, or None when ``info`` will do."""
    if info is None:
        return "no certificate yet"
    if info.self_signed:
        return "only a self-signed certificate"
    if not info.covers(names):
        missing = ", ".join(sorted(set(names) - info.names))
        return f"the certificate does not cover {missing}"
    if now >= info.not_after:
        return f"the certificate expired on {info.not_after:%Y-%m-%d %H:%M} UTC"
    if now >= info.renew_at():
        return f"the certificate expires on {info.not_after:%Y-%m-%d %H:%M} UTC"
    return None
