"""Address validation: the boundary between network input and paths below mailboxes_dir."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatmaild.common.accounts import AccountStore
from chatmaild.common.addr import (
    AddressError,
    address_literal,
    canonical_address,
    check_creatable,
    header_addresses,
    is_safe_dirname,
    valid_addr_spec,
)
from chatmaild.common.config import Config

DOMAIN = "chat.example.org"

HOSTILE = [
    "",
    "@" + DOMAIN,  # empty localpart
    "user",  # no domain at all
    "user@",  # empty domain
    f"../etc@{DOMAIN}",
    f"..@{DOMAIN}",
    f".@{DOMAIN}",
    f"a/b@{DOMAIN}",
    f"/etc/passwd@{DOMAIN}",
    f"user@{DOMAIN}/../../etc",
    f"user@../{DOMAIN}",
    f"user\0@{DOMAIN}",
    f"user@{DOMAIN}\0",
    f"us\ner@{DOMAIN}",
    f"us\ter@{DOMAIN}",
    f"us er@{DOMAIN}",
    f" user@{DOMAIN}",
    f"user@{DOMAIN} ",
    f".user@{DOMAIN}",  # leading dot
    f"user.@{DOMAIN}",  # trailing dot
    f"us..er@{DOMAIN}",  # double dot / empty part
    f"a.b..c@{DOMAIN}",
    f"user+tag@{DOMAIN}",
    f"user!x@{DOMAIN}",
    f"us\\er@{DOMAIN}",
    f'"quoted"@{DOMAIN}',
    f"a@b@{DOMAIN}",
    f"usér@{DOMAIN}",  # non-ASCII
    f"uѕer@{DOMAIN}",  # Cyrillic s lookalike
    "user@chat.exаmple.org",  # Cyrillic a in the domain
    f"ｕｓｅｒ@{DOMAIN}",  # fullwidth letters
    f"user\u200b@{DOMAIN}",  # zero-width space
    f"user\u0307@{DOMAIN}",  # combining dot
    f"K\u212a@{DOMAIN}",  # Kelvin sign lower()s to k
    f"user\x7f@{DOMAIN}",
    "user@other.example.org",  # other domain
    "user@example.org",  # parent domain
    f"user@sub.{DOMAIN}",  # subdomain
    f"user@{DOMAIN}.",  # trailing dot domain
    "x" * 65 + f"@{DOMAIN}",  # over RFC 5321 localpart length
    "a" * 10000 + f"@{DOMAIN}",
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_addresses_are_refused(raw):
    with pytest.raises(AddressError):
        canonical_address(raw, DOMAIN)


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_addresses_never_name_a_path(tmp_path, raw):
    store = AccountStore(Config(mail_domain=DOMAIN, mailboxes_dir=str(tmp_path / "mail")))
    with pytest.raises(AddressError):
        store.account(raw)
    assert store.lookup(raw) is None


@pytest.mark.parametrize(
    "raw,canonical",
    [
        (f"user@{DOMAIN}", f"user@{DOMAIN}"),
        (f"USER@{DOMAIN}", f"user@{DOMAIN}"),
        ("User@Chat.Example.ORG", f"user@{DOMAIN}"),
        (f"a.b_c-d@{DOMAIN}", f"a.b_c-d@{DOMAIN}"),
        (f"0123456789@{DOMAIN}", f"0123456789@{DOMAIN}"),
        (f"_x@{DOMAIN}", f"_x@{DOMAIN}"),
        ("x" * 64 + f"@{DOMAIN}", "x" * 64 + f"@{DOMAIN}"),
    ],
)
def test_valid_addresses_fold_to_one_canonical_form(raw, canonical):
    assert canonical_address(raw, DOMAIN) == canonical


def test_canonical_address_is_one_path_component(tmp_path):
    store = AccountStore(Config(mail_domain=DOMAIN, mailboxes_dir=str(tmp_path)))
    account = store.account(f"Some.One@{DOMAIN.upper()}")
    assert account.home.parent == Path(tmp_path)
    assert account.home.name == f"some.one@{DOMAIN}"


def test_ip_literal_domain():
    assert canonical_address("user@[10.0.0.1]", "[10.0.0.1]") == "user@[10.0.0.1]"
    with pytest.raises(AddressError):
        canonical_address("user@10.0.0.1", "[10.0.0.1]")


@pytest.mark.parametrize(
    "localpart,ok",
    [
        ("a1234", False),
        ("012345", True),
        ("0123456", True),
        ("0123456789", True),
        ("0123456789x", False),
    ],
)
def test_creation_length_bounds(localpart, ok):
    # the reference relay's own table, with username_min_length=6, max=10
    addr = f"{localpart}@{DOMAIN}"
    if ok:
        check_creatable(addr, 6, 10)
    else:
        with pytest.raises(AddressError, match="6 to 10"):
            check_creatable(addr, 6, 10)


@pytest.mark.parametrize("localpart", ["webmaster", "postmaster", "abuse", "mailer-daemon"])
def test_role_names_cannot_be_claimed(localpart):
    # webmaster has the default length (9): anyone's first login would have made it
    with pytest.raises(AddressError, match="reserved"):
        check_creatable(f"{localpart}@{DOMAIN}", 1, 64)
    check_creatable(f"{localpart}x@{DOMAIN}", 1, 64)  # only the names themselves


def test_creation_exact_length_message():
    with pytest.raises(AddressError, match="exactly 9"):
        check_creatable(f"short@{DOMAIN}", 9, 9)


@pytest.mark.parametrize(
    "name,safe",
    [
        (f"user@{DOMAIN}", True),
        ("pending_notifications", False),
        (".deleting-abc", False),
        (".hidden@x", False),
        ("..", False),
        (".", False),
        ("no-at-sign", False),
    ],
)
def test_is_safe_dirname(name, safe):
    assert is_safe_dirname(name) is safe


# --- addresses in mail (RFC 5321 address literals, RFC 5322 address lists) ------
# Parsed by our own code: email.utils.getaddresses refuses "<x@[192.0.2.1]>" on
# Debian's Python 3.11.2 and 3.13 but not on other 3.11 builds.


@pytest.mark.parametrize(
    "literal,expected",
    [
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[0.0.0.0]", "[0.0.0.0]"),
        ("[255.255.255.255]", "[255.255.255.255]"),
        ("[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
        ("[ipv6:2001:DB8::1]", "[ipv6:2001:db8::1]"),
        ("[IPv6:1:2:3:4:5:6:7:8]", "[ipv6:1:2:3:4:5:6:7:8]"),
        ("[IPv6:::1]", "[ipv6:::1]"),
        ("[IPv6:::]", "[ipv6:::]"),
        ("[IPv6:::ffff:192.0.2.1]", "[ipv6:::ffff:192.0.2.1]"),
        ("[IPv6:1:2:3:4:5:6:192.0.2.1]", "[ipv6:1:2:3:4:5:6:192.0.2.1]"),
        ("[IPv6:1:2:3:4::192.0.2.1]", "[ipv6:1:2:3:4::192.0.2.1]"),
        ("[256.0.0.1]", None),
        ("[192.0.2]", None),
        ("[192.0.2.1.]", None),
        ("[1234.0.2.1]", None),
        ("[192.0.2.1", None),
        ("192.0.2.1", None),
        ("[]", None),
        ("[2001:db8::1]", None),  # IPv6 needs its tag
        ("[IPv6:]", None),
        ("[IPv6:1:2:3:4:5:6:7]", None),
        ("[IPv6:1:2:3:4:5:6:7:8:9]", None),
        ("[IPv6:1:2:3:4:5:6:7::]", None),  # "::" must stand for two or more groups
        ("[IPv6:1:::2]", None),
        ("[IPv6:1::2::3]", None),
        ("[IPv6:12345::1]", None),
        ("[IPv6:fe80::1%eth0]", None),  # no zone ids in mail
        ("[IPv6:1:2:3:4:5::192.0.2.1]", None),
        ("[IPv6:192.0.2.1]", None),
        ("[IPv4:192.0.2.1]", None),
        ("[x-tag:anything]", None),  # other general-address-literals: nobody sends them
        ("[example.org]", None),
    ],
)
def test_address_literal(literal, expected):
    assert address_literal(literal) == expected


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses())
def test_every_ip_address_is_an_address_literal(ip):
    if ip.version == 4:
        assert address_literal(f"[{ip}]") == f"[{ip}]"
    else:
        assert address_literal(f"[IPv6:{ip.exploded}]") == f"[ipv6:{ip.exploded}]"
        assert address_literal(f"[IPv6:{ip}]") == f"[ipv6:{ip}]"


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF:.%", max_size=45))
def test_ipv6_literals_agree_with_ipaddress(text):
    """Same verdict as the stdlib except where RFC 5321 and it differ on purpose."""
    ours = address_literal(f"[IPv6:{text}]") is not None
    try:
        ipaddress.IPv6Address(text)
        stdlib = "%" not in text  # zone ids are for sockets, not for mail
    except ValueError:
        stdlib = False
    groups = [g for g in re.split(":+", text) if g]
    explicit = len(groups) + ("." in text)  # an IPv4 tail is two groups
    if "::" in text and explicit == 7:  # RFC 5321: "::" stands for 2+ groups
        assert not ours
    elif re.search(r"(^|[:.])0[0-9]", groups[-1] if groups and "." in text else ""):
        pass  # RFC 5321 Snum allows leading zeros, the stdlib refuses them
    else:
        assert ours == stdlib, text


@pytest.mark.parametrize(
    "value,expected",
    [
        ("<x@[192.0.2.1]>", ["x@[192.0.2.1]"]),
        ("x@[192.0.2.1]", ["x@[192.0.2.1]"]),
        ("One <one@[IPv6:2001:db8::1]>", ["one@[IPv6:2001:db8::1]"]),
        ("Alice <alice@example.org>", ["alice@example.org"]),
        ('"Alice, the first" <alice@example.org>', ["alice@example.org"]),
        ('"a \\"quote\\"" <alice@example.org>', ["alice@example.org"]),
        ("=?utf-8?q?Al=C3=AFce?= <alice@example.org>", ["alice@example.org"]),
        ("Joe Q. Public <jq@example.org>", ["jq@example.org"]),
        ("alice@example.org (Alice (the first))", ["alice@example.org"]),
        ("Alice\r\n <alice@example.org>", ["alice@example.org"]),
        ("<@relay.example,@r2.example:alice@example.org>", ["alice@example.org"]),
        ('<"john doe"@example.org>', ['"john doe"@example.org']),
        ("a@b.example, c@d.example", ["a@b.example", "c@d.example"]),
        (",a@b.example,,", ["a@b.example"]),
        ("team: a@b.example, c@d.example;", ["a@b.example", "c@d.example"]),
        ("undisclosed-recipients:;", []),
        ("", []),
        ("nobody", None),
        ("<a@b@example.org>", None),
        ("<@example.org>", None),
        ("<alice@example.org", None),
        ("alice@example.org>", None),
        ('"unterminated <alice@example.org>', None),
        ("(unterminated alice@example.org", None),
        ("alice@[192.0.2.1", None),
        ("alice@example.org\r\nFrom: x@y.example", None),
        ("a\x00b@example.org", None),
        ("team: a@b.example", None),
        ("outer: inner: a@b.example;;", None),
    ],
)
def test_header_addresses(value, expected):
    assert header_addresses(value) == expected


@pytest.mark.parametrize(
    "addr,expected",
    [
        ("X@[192.0.2.1]", "x@[192.0.2.1]"),
        ("x@[IPv6:2001:DB8::1]", "x@[ipv6:2001:db8::1]"),
        ("x@[300.0.2.1]", None),
        ("x@[IPv6:zz::1]", None),
        ("x@[example.org]", None),
        ("SRS0=hh=tt=example.com=x@fwd.example", "srs0=hh=tt=example.com=x@fwd.example"),
        ("x@example..org", None),
        ("x@", None),
        ("@example.org", None),
    ],
)
def test_valid_addr_spec(addr, expected):
    assert valid_addr_spec(addr) == expected


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_header_addresses_never_raise(value):
    found = header_addresses(value)
    assert found is None or all("@" in a for a in found)


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=30),
    local=st.from_regex(r"[a-z0-9_+=-]{1,20}", fullmatch=True),
    domain=st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
)
def test_any_quoted_display_name_keeps_the_address(name, local, domain):
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert header_addresses(f"{quoted} <{local}@{domain}>") == [f"{local}@{domain}"]
