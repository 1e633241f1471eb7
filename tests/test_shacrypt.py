"""SHA512-CRYPT through libcrypt without the GIL: same hashes as the stdlib/backport module."""

from __future__ import annotations

import warnings

import pytest

from chatmaild.common import shacrypt

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import crypt_r as stdlib_crypt  # type: ignore[import-not-found]
    except ImportError:
        import crypt as stdlib_crypt  # type: ignore[no-redef]


def test_libcrypt_is_used():
    # the point of the module: on Debian 12 and 13 libcrypt.so.1 is there, so no GIL is held
    assert shacrypt._crypt_rn is not None


def test_fresh_hash_verifies_with_the_stdlib():
    hashed = shacrypt.sha512_crypt("correct horse")
    prefix, kind, salt, digest = hashed.split("$")
    assert (prefix, kind, len(salt)) == ("", "6", shacrypt.SALT_LENGTH)
    assert set(salt) <= set(shacrypt.SALT_CHARS) and len(digest) == 86
    assert stdlib_crypt.crypt("correct horse", hashed) == hashed
    assert shacrypt.sha512_crypt("correct horse") != hashed  # salted


@pytest.mark.parametrize(
    "password, setting",
    [
        ("pw", "$6$abcdefgh"),
        ("pässwörd", "$6$rounds=6000$0123456789abcdef"),
        ("", "$6$x"),
        ("pw", "ab"),  # DES, as the stdlib gives for such a setting
    ],
)
def test_same_result_as_the_stdlib(password, setting):
    assert shacrypt.crypt(password, setting) == stdlib_crypt.crypt(password, setting)


def test_invalid_setting_gives_none():
    assert shacrypt.crypt("pw", "$6") is None
    assert shacrypt.crypt("pw", "*0") is None


@pytest.mark.parametrize("password, setting", [("p\0w", "$6$abc"), ("pw", "$6$a\0bc")])
def test_nul_is_refused_like_the_stdlib(password, setting):
    with pytest.raises(ValueError):
        shacrypt.crypt(password, setting)
    with pytest.raises(ValueError):
        stdlib_crypt.crypt(password, setting)


def test_unencodable_password_is_refused():
    with pytest.raises(UnicodeEncodeError):
        shacrypt.crypt("\udcff", "$6$abc")
