"""Logins doveauth has verified before, so that a device coming back is answered
without hashing its password again.

A Delta Chat device logs in at every reconnect (app start, network change, and
all devices at once after a network blip).  Dovecot verifying the stored
SHA512-CRYPT hash costs about 2 ms of CPU each time, in its one auth process.
doveauth verifies the first login of an account itself (libcrypt in a thread,
without the GIL) and remembers a keyed digest of the stored hash and the
password; a later login with the same password and the same stored hash is
answered with the password as Dovecot's ``{PLAIN}`` scheme, which Dovecot only
compares.  An account made again (a new salt) misses, a wrong password misses.

What is held is a digest per address, never a password; the key is random per
process and never written anywhere, so the table is worthless after a restart
and outside this process.  (Someone who can read this process's memory reads
the logins as they arrive anyway.)  Bounded: past ``limit`` addresses the
oldest entry goes.
"""

from __future__ import annotations

import hmac
import os

PLAIN_SCHEME = "{PLAIN}"
# ~200 bytes each (address, digest, dict slot): 20,000 devices' logins in 4 MB
VERIFIED_LOGINS = 20_000


class VerifiedLogins:
    def __init__(self, limit: int = VERIFIED_LOGINS) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._key = os.urandom(32)
        self._digests: dict[str, bytes] = {}
        self.hits = 0  # answered without hashing (the tests count them)

    def _digest(self, stored_hash: str, password: str) -> bytes:
        text = f"{stored_hash}\0{password}".encode("utf-8", "surrogatepass")
        return hmac.digest(self._key, text, "sha256")

    def known(self, addr: str, stored_hash: str, password: str) -> bool:
        """Whether ``password`` was verified against this ``stored_hash`` of ``addr``."""
        digest = self._digests.get(addr)
        if digest is None or not hmac.compare_digest(digest, self._digest(stored_hash, password)):
            return False
        self.hits += 1
        return True

    def add(self, addr: str, stored_hash: str, password: str) -> None:
        """``password`` matched ``stored_hash``: remember it (replacing what ``addr`` had)."""
        self._digests.pop(addr, None)
        self._digests[addr] = self._digest(stored_hash, password)
        if len(self._digests) > self.limit:
            del self._digests[next(iter(self._digests))]  # the oldest

    def __len__(self) -> int:
        return len(self._digests)
