"""chatmaild.dictd.verified: which logins doveauth need not hash again."""

from __future__ import annotations

import pytest

from chatmaild.dictd.verified import VerifiedLogins

HASH = "{SHA512-CRYPT}$6$salt$hash"


def test_a_login_is_known_only_with_its_password_and_its_stored_hash():
    logins = VerifiedLogins()
    assert not logins.known("a@x", HASH, "pw")
    logins.add("a@x", HASH, "pw")
    assert logins.known("a@x", HASH, "pw")
    assert not logins.known("a@x", HASH, "pw2")
    assert not logins.known("a@x", HASH + "x", "pw")  # the account made again
    assert not logins.known("b@x", HASH, "pw")
    assert logins.hits == 1


def test_bounded_the_oldest_goes_first():
    logins = VerifiedLogins(limit=3)
    for n in range(5):
        logins.add(f"{n}@x", HASH, "pw")
    assert len(logins) == 3
    assert not logins.known("0@x", HASH, "pw") and not logins.known("1@x", HASH, "pw")
    assert all(logins.known(f"{n}@x", HASH, "pw") for n in (2, 3, 4))
    logins.add("2@x", HASH, "new")  # replaced, and now the newest
    logins.add("5@x", HASH, "pw")
    assert logins.known("2@x", HASH, "new") and not logins.known("3@x", HASH, "pw")


def test_digests_differ_between_processes_and_passwords_are_not_kept():
    one, two = VerifiedLogins(), VerifiedLogins()
    one.add("a@x", HASH, "secret-password")
    two.add("a@x", HASH, "secret-password")
    assert one._digests["a@x"] != two._digests["a@x"]
    assert b"secret-password" not in one._digests["a@x"]


def test_lone_surrogates_do_not_raise():
    logins = VerifiedLogins()
    logins.add("a@x", HASH, "pw\udcff")
    assert logins.known("a@x", HASH, "pw\udcff") and not logins.known("a@x", HASH, "pw")


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        VerifiedLogins(limit=0)
