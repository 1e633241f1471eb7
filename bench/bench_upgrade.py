"""Package upgrades under load (issue 24, item 1): tests/test_deb_upgrade.py, run
by pytest with CHATMAILD_UPGRADE_TEST=1 (it is not part of ``make test``).  Prints
per release and step how long apt took and how many messages were accepted
meanwhile, then accepted, delivered, lost and delivered twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    if os.geteuid() != 0:
        print("bench_upgrade: needs root (boots machines)")
        return
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "tests/test_deb_upgrade.py"],
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "CHATMAILD_UPGRADE_TEST": "1"},
    )  # fmt: skip
    for line in res.stdout.splitlines():
        if line.startswith(("bookworm: ", "trixie: ")):
            print(f"upgrade {line}")
    if res.returncode != 0:
        raise RuntimeError(res.stdout[-3000:] + res.stderr[-2000:])
