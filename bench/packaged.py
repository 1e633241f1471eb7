"""What the benches of the installed package share (bench_soak, bench_devices_package):
the package built per release, a freshly booted machine with it installed, and
every process of the relay's units read from inside.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = os.environ.get("BENCH_SOAK_SUITES", "bookworm trixie").split()
POSTFIX = {"bookworm": "postfix@-.service", "trixie": "postfix.service"}
# every process of the units, as JSON lines: [unit, pid, comm, rss KiB, pss KiB, fds]
PROCESSES = r"""
import json, os, subprocess
for unit in UNITS:
    group = subprocess.run(["systemctl", "show", "-p", "ControlGroup", "--value", unit],
                           capture_output=True, text=True).stdout.strip()
    pids = []
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"):
        try:  # cgroup v2, or the hybrid layout of a container on a v1 host
            pids = open(f"{root}{group}/cgroup.procs").read().split()
            break
        except OSError:
            continue
    for pid in pids:
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
            rollup = {l.split(":")[0]: int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup")
                      if l.startswith(("Rss:", "Pss:"))}
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, IndexError, ValueError):
            continue
        print(json.dumps([unit, int(pid), comm, rollup["Rss"], rollup["Pss"], fds]))
"""


def built_debs(name: str) -> Iterator[tuple[str, Path]]:
    """(release, this checkout's package built for it) for each of SUITES."""
    from tests.test_deb import _build

    for suite in SUITES:
        dist = ROOT / ".tmp" / f"{name}-{suite}"
        if suite == "bookworm":
            yield suite, _build(["make", "deb", f"DIST={dist}"], dist)
        else:
            yield suite, _build([str(ROOT / "scripts/debian13.sh"), "run", "make", "deb",
                                 f"DIST={dist}"], dist)  # fmt: skip


@contextlib.contextmanager
def installed(suite: str, deb: Path):
    """A freshly booted machine of ``suite`` with ``deb`` installed, its limits
    lifted as an operator would (tests/deb_load.py), every unit active."""
    from testing.machine import Machine
    from tests import deb_load
    from tests.test_deb import DOMAIN, _units_active

    with Machine(suite, binds={str(deb.parent): "/debs", str(ROOT): str(ROOT)}) as m:
        m.sh(f"echo 'chatmaild chatmaild/mail_domain string {DOMAIN}' | debconf-set-selections")
        m.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q /debs/{deb.name} 2>&1",
             timeout=900)  # fmt: skip
        deb_load.lift_limits(m)
        _units_active(m)
        yield m


def unit_processes(m, units: list[str]) -> list[tuple[str, int, str, int, int, int]]:
    """(unit, pid, comm, RSS KiB, PSS KiB, fds) of every process of ``units``."""
    out = m.sh("python3 - <<'EOF'\nUNITS = " + json.dumps(units) + PROCESSES + "EOF\n")
    return [tuple(json.loads(line)) for line in out.splitlines()]
