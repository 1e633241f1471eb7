"""What another local user can do with a path: connect, list or read (tests only).

The probe runs as that user through ``setpriv`` with no supplementary groups,
in the system interpreter with nothing but the standard library, so it works
whatever directory the checkout or virtualenv lives in.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

PROBE = """
import errno, os, socket, sys
what, path = sys.argv[1], sys.argv[2]
try:
    if what == "connect":
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(path)
    elif what == "list":
        os.listdir(path)
    else:
        open(path, "rb").close()
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
else:
    print("OK")
"""
ACTIONS = ("connect", "list", "read")


def probe_as(user: str, group: str, what: str, path: str | Path) -> str:
    """``OK``, or the errno name (``EACCES``) when ``user`` tries ``what`` on ``path``."""
    if what not in ACTIONS:
        raise ValueError(f"what must be one of {ACTIONS}")
    res = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups",
         "/usr/bin/python3", "-I", "-c", PROBE, what, str(path)],
        capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"probe as {user} failed: {res.stderr.strip()}")
    return res.stdout.strip()
