"""Address validation: the security boundary between network input and paths.

Pure functions, no I/O.  An address that passes :func:`canonical_address` is
``<localpart>@<mail_domain>`` in lower case, with a localpart of
``[a-z0-9._-]`` that has no leading/trailing dot and no empty dot-parts, so it
is always exactly one safe directory name below ``mailboxes_dir``.
"""

from __future__ import annotations

import functools
import re

LOCALPART_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
MAX_LOCALPART = 64  # RFC 5321
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


@functools.lru_cache(maxsize=16)
def _valid_address_re(mail_domain: str) -> re.Pattern[str]:
    """A lower-case address that needs no further checks (the fast path of lookups)."""
    return re.compile(LOCALPART_RE.pattern + "@" + re.escape(mail_domain))


class AddressError(ValueError):
    """An address that cannot name an account on this relay."""


def canonical_address(raw: str, mail_domain: str) -> str:
    """Return the canonical (lower-case) address or raise AddressError.

    ``mail_domain`` is the configured domain (already canonical).  Only ASCII is
    folded; any non-ASCII character is refused rather than normalised, so two
    different byte strings can never map to one account by Unicode rules.
    """
    if isinstance(raw, str) and raw.isascii():
        addr = raw.lower()
        if len(addr) - len(mail_domain) - 1 <= MAX_LOCALPART and _valid_address_re(
            mail_domain
        ).fullmatch(addr):
            return addr
    # slow path: find out what exactly is wrong (or accept an edge case)
    if not isinstance(raw, str) or not raw:
        raise AddressError("empty address")
    if not raw.isascii():
        raise AddressError("address contains non-ASCII characters")
    if _CONTROL_OR_SPACE.search(raw):
        raise AddressError("address contains control characters or spaces")
    addr = raw.lower()
    localpart, sep, domain = addr.rpartition("@")
    if not sep or not localpart:
        raise AddressError("address has no localpart@domain form")
    if domain != mail_domain:
        raise AddressError(f"domain {domain!r} is not {mail_domain!r}")
    if len(localpart) > MAX_LOCALPART:
        raise AddressError("localpart longer than 64 characters")
    if not LOCALPART_RE.fullmatch(localpart):
        raise AddressError(
            "localpart must be a-z 0-9 . _ - without leading, trailing or double dots"
        )
    return f"{localpart}@{domain}"


def check_creatable(addr: str, min_length: int, max_length: int) -> None:
    """Extra rules for creating an account (on top of canonical_address)."""
    localpart = addr.rpartition("@")[0]
    if not min_length <= len(localpart) <= max_length:
        if min_length == max_length:
            raise AddressError(f"localpart must be exactly {min_length} characters")
        raise AddressError(f"localpart must be {min_length} to {max_length} characters")


def is_safe_dirname(name: str) -> bool:
    """Whether a directory entry name could be an account (used when walking the tree)."""
    return (
        "@" in name
        and "/" not in name
        and "\0" not in name
        and name not in (".", "..")
        and not name.startswith(".")
    )
