"""Address validation: the security boundary between network input and paths.

Pure functions, no I/O.  An address that passes :func:`canonical_address` is
``<localpart>@<mail_domain>`` in lower case, with a localpart of
``[a-z0-9._-]`` that has no leading/trailing dot and no empty dot-parts, so it
is always exactly one safe directory name below ``mailboxes_dir``.

The second half parses addresses as they appear in mail (SMTP paths, From
headers): :func:`header_addresses`, :func:`valid_addr_spec`,
:func:`address_literal`.
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


# the mailbox names of RFC 2142 and the ones mail software writes to or from itself:
# whoever made such an account first would read what is meant for the operator
# (reports, bounces, certificate mail), or could pass for the relay in replies
RESERVED_LOCALPARTS = frozenset(
    {"postmaster", "abuse", "hostmaster", "webmaster", "security", "noc", "info",
     "marketing", "sales", "support", "usenet", "news", "www", "uucp", "ftp",
     "mailer-daemon", "root", "admin", "administrator", "nobody", "noreply",
     "no-reply"}
)  # fmt: skip


def check_creatable(addr: str, min_length: int, max_length: int) -> None:
    """Extra rules for creating an account (on top of canonical_address)."""
    localpart = addr.rpartition("@")[0]
    if localpart in RESERVED_LOCALPARTS:
        raise AddressError(f"localpart {localpart!r} is reserved (RFC 2142, mail software)")
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


# --- addresses in mail: SMTP paths and header fields (RFC 5321 / RFC 5322) -------
#
# Parsed here rather than with email.utils, whose answers changed between
# Python patch releases (getaddresses became strict about domain literals in
# 3.11.x/3.12.x security updates): the filters must give the same verdict on
# every interpreter.  Everything below is pure and never raises on input.

MAX_ADDR = 320
_ATOM_RE = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_QUOTED_LOCAL_RE = re.compile(r'"(?:[^"\\\r\n]|\\[^\r\n])*"')
# letters/digits/hyphen/underscore labels; UTF-8 labels allowed (SMTPUTF8), no empty label
_LABEL = r"(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?|[^\x00-\x7f.@\s]+)"
_MAIL_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# any local part seen in the wild (SRS, dots anywhere); no specials, spaces or controls
_ANY_LOCAL_RE = re.compile(r"[^\x00-\x20\x7f\"@<>()\[\]\\,;:]+")
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])")
_SNUM_RE = re.compile(r"[0-9]{1,3}")
_HEX_RE = re.compile(r"[0-9a-f]{1,4}")


def _ipv4(text: str) -> bool:
    """RFC 5321 IPv4-address-literal: four decimal Snum 0..255."""
    nums = text.split(".")
    return len(nums) == 4 and all(_SNUM_RE.fullmatch(n) and int(n) <= 255 for n in nums)


def _hex_groups(text: str) -> int | None:
    """Number of ``IPv6-hex`` groups in ``a:b:c`` (0 for ""), None if malformed."""
    if not text:
        return 0
    groups = text.split(":")
    return len(groups) if all(_HEX_RE.fullmatch(g) for g in groups) else None


def _ipv6(text: str) -> bool:
    """RFC 5321 IPv6-addr (full, compressed, and both with a trailing IPv4), lower case."""
    total = 8
    if "." in text:  # IPv6v4-full / IPv6v4-comp: the last 32 bits written as IPv4
        head, _, v4 = text.rpartition(":")
        if not _ipv4(v4):
            return False
        # "a::1.2.3.4" leaves "a:" whose colon belongs to the "::"
        text, total = (head + ":" if head.endswith(":") else head), 6
    if text.count("::") > 1:
        return False
    if "::" in text:
        left, _, right = text.partition("::")
        n_left, n_right = _hex_groups(left), _hex_groups(right)
        # "::" stands for at least two groups of zeros
        return n_left is not None and n_right is not None and n_left + n_right <= total - 2
    return _hex_groups(text) == total


def address_literal(domain: str) -> str | None:
    """``[a.b.c.d]`` or ``[IPv6:...]`` (RFC 5321 4.1.3) in lower case, else None.

    Other general-address-literal tags are not accepted: nothing sends them.
    """
    if not isinstance(domain, str) or not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1].lower()
    if inner.startswith("ipv6:"):
        return f"[{inner}]" if _ipv6(inner[5:]) else None
    return f"[{inner}]" if _ipv4(inner) else None


def valid_addr_spec(addr: str) -> str | None:
    """Lower-cased ``local@domain`` if ``addr`` is one, else None.

    The local part is a quoted string or any run of non-special characters
    (SRS, leading/double dots are seen in the wild); the domain is a host name
    (UTF-8 labels allowed) or an RFC 5321 address literal.
    """
    if not isinstance(addr, str):
        return None
    addr = addr.lower()
    if not addr or len(addr) > MAX_ADDR or not addr.isprintable():
        return None
    if addr.startswith('"'):
        m = _QUOTED_LOCAL_RE.match(addr)
        if not m or addr[m.end() : m.end() + 1] != "@":
            return None
        local, domain = addr[: m.end()], addr[m.end() + 1 :]
    else:
        local, sep, domain = addr.partition("@")
        if not sep or not _ANY_LOCAL_RE.fullmatch(local):
            return None
    if not local or not domain:
        return None
    if domain.startswith("["):
        domain = address_literal(domain) or ""
        if not domain:
            return None
    elif len(domain) > 255 or not _MAIL_DOMAIN_RE.fullmatch(domain):
        return None
    return f"{local}@{domain}"


# RFC 5322 3.2.3 specials; everything else printable (and UTF-8, RFC 6532) makes atoms
_SPECIALS = frozenset('()<>[]:;@\\,."')
_Token = tuple[str, str]  # (kind, text); kind is "atom", "qs", "dl" or the special itself


def _is_ctl(c: str) -> bool:
    return c < " " or c == "\x7f"


def _tokens(value: str) -> list[_Token] | None:
    """RFC 5322 lexical tokens of an unfolded header value; comments and
    whitespace dropped.  None on anything unbalanced or a control character."""
    out: list[_Token] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in " \t":
            i += 1
        elif c == "(":  # comment, may nest, may hold quoted-pairs
            depth = 0
            while True:
                if i >= n:
                    return None
                c = value[i]
                if c == "\\":
                    i += 2
                    continue
                if _is_ctl(c) and c != "\t":
                    return None
                if c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        elif c == '"':
            j = i + 1
            while True:
                if j >= n:
                    return None
                c = value[j]
                if c == "\\":
                    j += 2
                    continue
                if c == '"':
                    break
                if _is_ctl(c) and c != "\t":
                    return None
                j += 1
            out.append(("qs", value[i : j + 1]))
            i = j + 1
        elif c == "[":
            j = value.find("]", i)
            if j < 0:
                return None
            literal = value[i : j + 1]
            if "[" in literal[1:] or "\\" in literal or any(_is_ctl(x) for x in literal):
                return None
            out.append(("dl", literal))
            i = j + 1
        elif c in "<>@,;:.":
            out.append((c, c))
            i += 1
        elif c in _SPECIALS or _is_ctl(c):
            return None
        else:
            j = i + 1
            while j < n and value[j] not in _SPECIALS and value[j] not in " \t":
                if _is_ctl(value[j]):
                    return None
                j += 1
            out.append(("atom", value[i:j]))
            i = j
    return out


class _AddressListParser:
    """Recursive descent over :func:`_tokens` for RFC 5322 3.4 address lists
    (with the obsolete forms: empty list elements, routes, dotted phrases)."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0
        self.found: list[str] = []

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self) -> str:
        self.i += 1
        return self.tokens[self.i - 1][1]

    def address_list(self) -> list[str] | None:
        while self.peek() is not None:
            if self.peek() == ",":
                self.take()
                continue
            if not self.address(in_group=False) or self.peek() not in (",", None):
                return None
        return self.found

    def address(self, in_group: bool) -> bool:
        start = self.i
        while self.peek() in ("atom", "qs", "."):
            self.take()
        words = self.tokens[start : self.i]
        nxt = self.peek()
        if nxt == ":" and words and not in_group:  # group: display-name ":" [list] ";"
            self.take()
            while self.peek() != ";":
                if self.peek() == ",":
                    self.take()
                    continue
                if self.peek() is None or not self.address(in_group=True):
                    return False
                if self.peek() not in (",", ";"):
                    return False
            self.take()
            return True
        if nxt == "<":  # [display-name] angle-addr
            self.take()
            if self.peek() == "@" and not self.route():
                return False
            local_start = self.i
            while self.peek() in ("atom", "qs", "."):
                self.take()
            spec = self.addr_spec(self.tokens[local_start : self.i])
            if spec is None or self.peek() != ">":
                return False
            self.take()
            self.found.append(spec)
            return True
        if nxt == "@" and words:  # bare addr-spec: the words were its local part
            spec = self.addr_spec(words)
            if spec is None:
                return False
            self.found.append(spec)
            return True
        return False

    def route(self) -> bool:
        """obs-route ``@a.example,@b.example:`` before the address: skipped."""
        while self.peek() in ("@", ",", "atom", ".", "dl"):
            self.take()
        if self.peek() != ":":
            return False
        self.take()
        return True

    def addr_spec(self, local: list[_Token]) -> str | None:
        if not local or self.peek() != "@":
            return None
        self.take()
        if self.peek() == "dl":
            domain = self.take()
        else:
            parts = []
            while self.peek() in ("atom", "."):
                parts.append(self.take())
            domain = "".join(parts)
        if not domain:
            return None
        return "".join(text for _, text in local) + "@" + domain


def header_addresses(value: str) -> list[str] | None:
    """The addr-specs (as written) of an RFC 5322 address-list header value, in
    order, group members included; None if the value does not parse."""
    if not isinstance(value, str) or len(value) > 65536:
        return None
    unfolded = _FOLD_RE.sub("", value)
    if "\r" in unfolded or "\n" in unfolded:
        return None
    tokens = _tokens(unfolded)
    if tokens is None:
        return None
    return _AddressListParser(tokens).address_list()
