"""Directories the tests hand to servers, and the check that no server outlives the run.

Every directory given to Postfix, Dovecot or a daemon lives below one directory
of this session (``world_readable_tempdir``), so ``leftover_processes`` finds
this run's processes and no other run's: a process whose command line or
MAIL_CONFIG names that directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_session_base: Path | None = None


def session_base() -> Path:
    global _session_base
    if _session_base is None:
        _session_base = Path(tempfile.mkdtemp(prefix="chatmail-test-", dir="/tmp"))
        _session_base.chmod(0o755)
    return _session_base


def session_base_if_made() -> Path | None:
    return _session_base


def world_readable_tempdir(prefix: str) -> Path:
    """A fresh directory that Postfix, Dovecot and vmail can traverse (pytest's own
    tmp dirs are 0700), below this session's base directory."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=session_base()))
    path.chmod(0o755)
    return path


def leftover_processes(base: Path) -> list[str]:
    """Processes (other than this one) that belong to a directory below ``base``."""
    marker = str(base).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (marker in cmdline or b"MAIL_CONFIG=" + marker in environ):
            found.append(f"pid {entry}: {cmdline.decode(errors='replace').strip()}")
    return found
