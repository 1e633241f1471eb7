"""SHA512-CRYPT hashing that lets other threads run meanwhile.

Python's ``crypt`` module (and its 3.13 backport ``crypt_r``) holds the GIL
for the whole hash (~2 ms for the 5000 default rounds), so account creations
in doveauth's worker threads ran one at a time on one core and stalled the
event loop while they did.  The same libxcrypt function called through ctypes
runs without the GIL: creations hash on every core.  Where libcrypt cannot be
loaded the module falls back to the stdlib/backport (same results, GIL held).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import secrets
import warnings

SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SALT_LENGTH = 16  # what crypt.mksalt(METHOD_SHA512) makes
# sizeof(struct crypt_data) in libxcrypt (Debian 12 and 13): the scratch crypt_rn needs
CRYPT_DATA_SIZE = 32768


def _load_crypt_rn():
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    try:
        func = ctypes.CDLL(name, use_errno=True).crypt_rn
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_char_p
    func.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int)
    return func


_crypt_rn = _load_crypt_rn()


def _stdlib_crypt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:  # Python >= 3.13 has no stdlib crypt; crypt-r is its backport
            import crypt_r as module  # type: ignore[import-not-found]
        except ImportError:
            import crypt as module  # type: ignore[no-redef]
    return module


def crypt(password: str, setting: str) -> str | None:
    """``crypt(3)`` of ``password`` with ``setting`` (a salt or a whole hash), or None.

    Like the stdlib: a NUL in either raises ValueError, text that is not
    UTF-8-encodable raises UnicodeEncodeError.
    """
    phrase, salt = password.encode(), setting.encode()
    if b"\0" in phrase or b"\0" in salt:
        raise ValueError("embedded null character")
    if _crypt_rn is None:
        return _stdlib_crypt().crypt(password, setting)
    scratch = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
    result = _crypt_rn(phrase, salt, scratch, CRYPT_DATA_SIZE)
    if result is None or result.startswith(b"*"):  # invalid setting
        return None
    return result.decode("ascii")


def sha512_crypt(password: str) -> str:
    """A fresh ``$6$<salt>$<hash>`` for ``password`` (default rounds, as Dovecot expects)."""
    # 64 characters: a random byte modulo 64 is uniform (one getrandom call, not 16)
    salt = "".join(SALT_CHARS[b % 64] for b in secrets.token_bytes(SALT_LENGTH))
    hashed = crypt(password, f"$6${salt}")
    if hashed is None:
        raise RuntimeError("libcrypt refused a SHA512-CRYPT salt")
    return hashed
