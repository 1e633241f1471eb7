"""Everything killed at once, 50 times in a row (issue 24, item 3): the big
version of tests/test_kill_all.py (5 times in `make test`), run by pytest with
KILL_ROUNDS=50.  Prints the test's count line: messages accepted, delivered,
lost, delivered twice; accounts and tokens made under the load.

The relay's supervisor doubles its restart delay up to 30 s while restarts
come within a minute of each other (make run's back-off), so 50 rounds take
about half an hour.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = os.environ.get("BENCH_KILL_ROUNDS", "50")


def main() -> None:
    if os.geteuid() != 0:
        print("bench_kill_all: needs root (starts Postfix and Dovecot)")
        return
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "tests/test_kill_all.py"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "KILL_ROUNDS": ROUNDS},
    )  # fmt: skip
    lines = [x for x in res.stdout.splitlines() if "rounds," in x or "cut off" in x]
    for line in lines:
        print(f"kill all: {line.strip()} (target: 0 lost)")
    if res.returncode != 0:
        raise RuntimeError(res.stdout[-3000:] + res.stderr[-2000:])
