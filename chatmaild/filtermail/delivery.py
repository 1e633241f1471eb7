"""Decisions of remote delivery (the ``transport`` role), free of I/O.

What a destination domain's TLS policy is (the same rules as Postfix's
``tls_policy`` map for port 25), where it is reached (MX records in
preference order), what another relay's answer to ``POST /mxdeliv`` means,
and the LMTP reply Postfix gets for each recipient (README, "HTTPS delivery:
sending").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from chatmaild.common.addr import address_literal

# a relay that answered "not here" (no /mxdeliv route) is asked again after this
NO_HTTPS_TTL = 30 * 60.0
MAX_REPLY_TEXT = 300  # of a peer's answer, in our reply (and so in a bounce)


class TLSPolicy(Enum):
    VERIFY = "verify"  # the certificate must be valid for the MX name
    ENCRYPT = "encrypt"  # TLS required, certificate not checked
    MAY = "may"  # TLS if offered


def tls_policy(domain: str) -> TLSPolicy:
    """The TLS policy for mail to ``domain``: postfix/tls_policy's rules.

    An IP literal and a name starting with ``_`` (test relays) cannot have a
    certificate a CA verified; nauta.cu's servers offer no STARTTLS.
    """
    if domain.startswith("[") or domain.startswith("_"):
        return TLSPolicy.ENCRYPT
    if domain == "nauta.cu":
        return TLSPolicy.MAY
    return TLSPolicy.VERIFY


def literal_host(domain: str) -> str | None:
    """The address of an IP-literal domain (``[1.2.3.4]``, ``[IPv6:...]``), or None."""
    literal = address_literal(domain)  # RFC 5321's forms, lower case
    if literal is None:
        return None
    return literal[1:-1].removeprefix("ipv6:")


@dataclass(frozen=True)
class MXResult:
    hosts: tuple[str, ...] = ()  # in preference order
    error: str | None = None  # an LMTP reply for every recipient instead


def mx_hosts(domain: str, records: list[tuple[int, str]] | None, nxdomain: bool) -> MXResult:
    """Where mail for ``domain`` goes, from its MX ``records`` (preference, exchange;
    None: the name has no MX record) as RFC 5321 section 5.1 and RFC 7505 say."""
    if nxdomain:
        return MXResult(error=f"550 5.1.2 domain {domain} does not exist")
    if not records:
        return MXResult(hosts=(domain,))  # the implicit MX: the domain itself
    names = [(pref, name.rstrip(".").lower()) for pref, name in records]
    if any(name == "" for _, name in names):
        return MXResult(error=f"556 5.1.10 domain {domain} accepts no mail (null MX)")
    return MXResult(hosts=tuple(dict.fromkeys(name for _, name in sorted(names))))


class Kind(Enum):
    DELIVERED = "delivered"
    PERMANENT = "permanent"  # bounce with the peer's reason
    TEMPORARY = "temporary"  # stays in the queue
    NO_ROUTE = "no-route"  # the host does not take mail over HTTPS: SMTP instead
    FAILED = "failed"  # the host's web server failed: the next host, then SMTP


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    reply: str  # an LMTP reply line ("250 2.0.0 ...")


_SMTP_REPLY = re.compile(r"([245])\d\d(?:[ -](?:([245]\.\d{1,3}\.\d{1,3})\s)?(.*))?", re.S)


def clean_text(raw: bytes | str) -> str:
    """A peer's text made safe for one reply line: printable ASCII, bounded."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text[:MAX_REPLY_TEXT]


def _with_code(text: str, default_class: str, host: str, what: str, generic: str = "") -> str:
    """An LMTP reply carrying the SMTP code of ``text`` when it has one of the
    expected class, else ``generic`` or a generic code of ``default_class`` ("4", "5")."""
    m = _SMTP_REPLY.fullmatch(text)
    if m and m.group(1) == default_class:
        code = text[:3]
        enhanced = m.group(2) or f"{default_class}.0.0"
        rest = m.group(3) or ""
        return f"{code} {enhanced} {host} said: {rest}".rstrip()
    generic = generic or ("554 5.0.0" if default_class == "5" else "451 4.0.0")
    return f"{generic} {host} {what}: {text}".rstrip()


def mxdeliv_outcome(host: str, status: int, marker: str, body: bytes) -> Outcome:
    """What the answer of ``host`` to ``POST /mxdeliv`` means.

    ``marker`` is its ``X-Mxdeliv`` field (ours: delivered, permanent,
    temporary).  Without one the peer may be a relay of the reference
    implementation, whose success is 200 and whose refusals are 400 (the SMTP
    reply as body) and 413; any other answer without the marker (404, 405, ...)
    comes from a web server without the route.
    """
    text = clean_text(body)
    marker = marker.strip().lower()
    what = f"answered {status} to /mxdeliv"
    if 200 <= status < 300:
        return Outcome(Kind.DELIVERED, f"250 2.0.0 delivered over HTTPS to {host}")
    if marker == "permanent":
        too_big = "552 5.3.4" if status == 413 else ""
        return Outcome(Kind.PERMANENT, _with_code(text, "5", host, what, too_big))
    if marker == "temporary":
        return Outcome(Kind.TEMPORARY, _with_code(text, "4", host, what))
    if marker:
        return Outcome(Kind.TEMPORARY, f"451 4.0.0 {host} {what}, X-Mxdeliv: {clean_text(marker)}")
    if status == 400 and text[:1] in ("4", "5") and _SMTP_REPLY.fullmatch(text):
        kind = Kind.PERMANENT if text[0] == "5" else Kind.TEMPORARY
        return Outcome(kind, _with_code(text, text[0], host, what))
    if status == 413:
        return Outcome(Kind.PERMANENT, f"552 5.3.4 {host} {what}: message too big")
    if status >= 500:
        return Outcome(Kind.FAILED, f"451 4.4.0 {host} {what}")
    return Outcome(Kind.NO_ROUTE, f"451 4.4.0 {host} {what}: no HTTPS delivery there")


def smtp_reply(host: str, code: int, text: bytes | str) -> str:
    """Our LMTP reply for a remote SMTP server's reply ``code`` ``text``."""
    cleaned = clean_text(text)
    if 200 <= code < 300:
        return f"250 2.0.0 delivered over SMTP to {host}: {code} {cleaned}".rstrip()
    cls = "5" if 500 <= code < 600 else "4"
    m = re.match(r"([245]\.\d{1,3}\.\d{1,3})\s+(.*)", cleaned)
    if m and m.group(1)[0] == cls:
        enhanced, rest = m.group(1), m.group(2)
    else:
        enhanced, rest = f"{cls}.0.0", cleaned
    if 400 <= code < 600:
        return f"{code} {enhanced} {host} said: {rest}".rstrip()
    return f"{554 if cls == '5' else 451} {enhanced} {host} said: {code} {rest}".rstrip()


def reply_class(reply: str) -> str:
    """ "sent", "deferred" or "bounced": the log word of an LMTP reply."""
    return {"2": "sent", "4": "deferred"}.get(reply[:1], "bounced")
