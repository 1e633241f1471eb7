"""Which Dovecot is installed: the version, and the configuration series it speaks.

Dovecot 2.4 changed the configuration syntax and removed the dict and
checkpassword passdb/userdb drivers, so the renderer writes one of two
configurations (``dovecot/dovecot.conf`` for 2.3, ``dovecot/dovecot-2.4.conf``
for 2.4) from the same chatmail.ini.
"""

from __future__ import annotations

import functools
import re
import subprocess

SERIES = ("2.3", "2.4")


class UnsupportedDovecot(RuntimeError):
    """No Dovecot, or one whose configuration we cannot write."""


@functools.cache
def dovecot_version() -> str | None:
    """``dovecot --version``'s version ("2.3.19.1", "2.4.1-4"), None without Dovecot."""
    try:
        out = subprocess.run(
            ["dovecot", "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.split()[0] if out.split() else None


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """(2, 4, 1) for "2.4.1-4 (7d8c0e5759)"; None if it does not start with numbers."""
    match = re.match(r"\d+(?:\.\d+)*", version or "")
    return tuple(int(n) for n in match.group(0).split(".")) if match else None


def series_of(version: str | None) -> str:
    """The series, "2.3" or "2.4"; UnsupportedDovecot for anything else."""
    numbers = version_tuple(version)
    name = ".".join(str(n) for n in numbers[:2]) if numbers else None
    if name not in SERIES:
        raise UnsupportedDovecot(
            f"Dovecot {version or '(not installed)'} is not supported: "
            f"chatmaild writes configuration for Dovecot {' and '.join(SERIES)}"
        )
    return name  # type: ignore[return-value]


def installed_series() -> str:
    """The series of the Dovecot on this machine (UnsupportedDovecot without one)."""
    return series_of(dovecot_version())
