"""Build and vet the Dovecot no-delay shim (``dovecot/nodelay.c``).

The shim interposes one Dovecot library function by its exact signature, so
it is only used with the Dovecot versions it was checked against: every 2.3,
and 2.4.0 to 2.4.4 (the 500 ms delay is still hard-coded in their
lib-storage/mailbox-watch.c, and timeout_add_short() kept its signature).
With any other version (or without gcc) the relay runs without it: correct,
just ~500 ms slower to announce new mail to IDLE clients.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from chatmaild.relay.dovecotversion import dovecot_version, version_tuple
from chatmaild.relay.render import SOURCE_ROOT

__all__ = ["applies", "build", "dovecot_version", "prepare_nodelay"]

log = logging.getLogger("chatmaild.relay.nodelay")

SO_NAME = "dovecot_nodelay.so"


class NodelayUnavailable(RuntimeError):
    pass


def applies(version: str | None) -> bool:
    """Whether the shim was checked against this Dovecot version."""
    # timeout_add_short(msecs, file, line, cb, ctx) and NOTIFY_DELAY_MSECS = 500 in
    # lib-storage/mailbox-watch.c, read in the sources of each of these
    numbers = version_tuple(version) or ()
    return numbers[:2] == (2, 3) or (2, 4, 0) <= numbers[:3] <= (2, 4, 4)


def build(dest_dir: Path, source: Path | None = None) -> Path:
    """Compile the shim into ``dest_dir`` (reused while the source and Dovecot are unchanged)."""
    source = source or SOURCE_ROOT / "dovecot" / "nodelay.c"
    version = dovecot_version()
    if not applies(version):
        raise NodelayUnavailable(f"the shim was not checked against Dovecot {version}")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise NodelayUnavailable("no C compiler (gcc) found")
    digest = hashlib.sha256(source.read_bytes() + (version or "").encode()).hexdigest()[:16]
    so = dest_dir / SO_NAME
    stamp = dest_dir / f"{SO_NAME}.sha"
    if so.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return so
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f".{SO_NAME}.tmp"
    res = subprocess.run(
        [gcc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(tmp), str(source), "-ldl"],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise NodelayUnavailable(f"building {source} failed: {res.stderr.strip()}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, so)
    stamp.write_text(digest + "\n")
    return so


def prepare_nodelay(dest_dir: Path, required: bool = False) -> Path | None:
    """The shim's path, or None (logged) when it does not apply; ``required`` raises instead."""
    try:
        return build(dest_dir)
    except NodelayUnavailable as e:
        if required:
            raise
        log.warning("running Dovecot without the no-delay shim: %s", e)
        return None
