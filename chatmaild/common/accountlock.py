"""The per-account creation lock and the files an interrupted creation leaves.

Account creation (and a password change) holds ``flock(LOCK_EX)`` on the
account directory ``<addr>/`` itself and writes ``password.tmp-<random>``
before renaming it to ``password``.  A process killed in between (``kill -9``,
power loss) leaves a directory without a password file holding some of::

    enforceE2EEincoming  password.tmp-<random>

A creation renames its temp file to ``password`` before the fsyncs (one
journal commit instead of two), so a power loss in that last step can also
leave an empty ``password``; an empty password file is no account either.
(And ``password.lock``, the lock file of versions before the directory lock,
which every creation made; it is still recognised as a leftover).

Such a directory is not an account: nothing lists it, the next creation for
the address completes it (removing the stale temp files under the lock), and
chatmail-expire removes it a day later if nobody does.  Whoever holds the lock
is the only writer of ``password.tmp-*`` files in that directory, so under the
lock every such file is stale.

Kept free of other imports: chatmail-expire and chatmail-quota-expire load it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time

PASSWORD = "password"
PASSWORD_LOCK = PASSWORD + ".lock"
PASSWORD_TMP_PREFIX = PASSWORD + ".tmp-"
FLAG_ENFORCE_E2EE = "enforceE2EEincoming"
POLL_INTERVAL = 0.01


def is_password_temp(name: str) -> bool:
    return name.startswith(PASSWORD_TMP_PREFIX) and len(name) > len(PASSWORD_TMP_PREFIX)


def is_creation_leftover(name: str, empty: bool = False) -> bool:
    """Whether an interrupted creation can have left this file (``empty``: it has size 0)."""
    if name == PASSWORD:
        return empty
    return name in (PASSWORD_LOCK, FLAG_ENFORCE_E2EE) or is_password_temp(name)


def acquire(dir_fd: int, timeout: float) -> bool:
    """Lock the account directory open as ``dir_fd``; closing ``dir_fd`` releases it.

    The lock is ``flock(LOCK_EX)`` on that descriptor of the directory itself, so
    taking it creates no file: one inode less per account creation, which is
    where a creation's kernel time goes (ext4 inode allocation).  ``timeout`` 0
    tries once and returns False when another process holds the lock; otherwise
    waits up to ``timeout`` seconds and raises TimeoutError.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                if timeout <= 0:
                    return False
                raise TimeoutError(
                    errno.ETIMEDOUT, f"account directory locked for more than {timeout}s"
                ) from None
            time.sleep(POLL_INTERVAL)


def remove_password_temps(dir_fd: int) -> list[str]:
    """Unlink every ``password.tmp-*`` in the directory; call only under the lock."""
    removed = []
    for name in os.listdir(dir_fd):
        if is_password_temp(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
    return removed
