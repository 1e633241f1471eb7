"""Address validation: the boundary between network input and paths below mailboxes_dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatmaild.accounts import AccountStore
from chatmaild.addr import AddressError, canonical_address, check_creatable, is_safe_dirname
from chatmaild.config import Config

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
