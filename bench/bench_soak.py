"""A long run of the packaged relay under systemd (issue 24, item 5).

For each release (BENCH_SOAK_SUITES, default "bookworm trixie"): the package of
this checkout installed on a freshly booted machine (tests/test_deb.py's), then
BENCH_SOAK_SECONDS (default 3600) of load from tests/deb_load.py in its network
namespace: encrypted mail submitted over 465 at BENCH_SOAK_RATE messages a
second (default 5) to three recipients with push tokens, a login every second,
a new account with a push token every 10 s.  Every BENCH_SOAK_EVERY seconds
(default 60) each process of the relay's units is sampled: RSS, open file
descriptors.  Afterwards the queue is drained and every INBOX read.

Prints per release: messages accepted, delivered, lost, delivered twice; accounts
made and their tokens; restarts of every unit (target 0); and for every process
that lived through the run, its RSS and descriptors after warm-up (the first
sample after a tenth of the run) and at the end: the largest growth (target:
flat).  Not covered: port 25 in and out (the machine has no peer and no DNS).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("BENCH_SOAK_SECONDS", "3600"))
EVERY = float(os.environ.get("BENCH_SOAK_EVERY", "60"))
RATE = os.environ.get("BENCH_SOAK_RATE", "5")
SUITES = os.environ.get("BENCH_SOAK_SUITES", "bookworm trixie").split()
UNITS = ["chatmail-dict.service", "filtermail.service", "chatmail-newemail.service",
         "dovecot.service"]  # fmt: skip
POSTFIX = {"bookworm": "postfix@-.service", "trixie": "postfix.service"}
# every process of the units: (unit, pid, comm, rss KiB, fds), as JSON lines
SAMPLE = r"""
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
            rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status")
                       if l.startswith("VmRSS:"))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration):
            continue
        print(json.dumps([unit, int(pid), comm, rss, fds]))
"""


def _sample(m, units: list[str]) -> dict[tuple[str, int, str], tuple[int, int]]:
    out = m.sh("python3 - <<'EOF'\nUNITS = " + json.dumps(units) + SAMPLE + "EOF\n")
    found = {}
    for line in out.splitlines():
        unit, pid, comm, rss, fds = json.loads(line)
        found[(unit, pid, comm)] = (rss, fds)
    return found


def soak(suite: str, deb: Path) -> None:
    from testing.machine import Machine
    from tests import deb_load
    from tests.test_deb import DOMAIN, _show, _units_active

    units = [*UNITS, POSTFIX[suite]]
    with Machine(suite, binds={str(deb.parent): "/debs", str(ROOT): str(ROOT)}) as m, \
            tempfile.TemporaryDirectory(prefix="soak-") as tmp:  # fmt: skip
        m.sh(f"echo 'chatmaild chatmaild/mail_domain string {DOMAIN}' | debconf-set-selections")
        m.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q /debs/{deb.name} 2>&1",
             timeout=900)  # fmt: skip
        deb_load.lift_limits(m)
        _units_active(m)
        work = Path(tmp)
        env = {**os.environ, "LOAD_RATE": RATE, "LOAD_EXTRA": "1"}
        with deb_load.running(m, work, DOMAIN, env) as load:
            start = time.monotonic()
            samples = []
            while (elapsed := time.monotonic() - start) < SECONDS:
                time.sleep(min(EVERY, SECONDS - elapsed))
                if load.poll() is not None:
                    raise RuntimeError("the load stopped: " + (load.stderr.read() or ""))
                samples.append((time.monotonic() - start, _sample(m, units)))
        result = deb_load.stop_drain_count(m, work, load, drain=300)
        print(f"soak {suite}: {SECONDS:.0f} s: {result['accepted']} accepted,"
              f" {result['delivered']} delivered, {result['lost']} lost,"
              f" {result['twice']} delivered twice (target: 0 lost, 0 twice);"
              f" {result['created']} accounts made, {result['tokens']} tokens kept"
              f" of {result['created'] + 3}; errors {result['errors']}")  # fmt: skip
        restarts = {u: _show(m, u, "NRestarts")["NRestarts"] for u in units}
        print(f"soak {suite}: unit restarts {restarts} (target: all 0)")
        warm_at = next(i for i, (t, _) in enumerate(samples) if t >= SECONDS / 10)
        warm, end = samples[warm_at][1], samples[-1][1]
        lived = sorted(set(warm) & set(end))
        if not lived:
            raise RuntimeError(f"no process sampled at warm-up and at the end: {warm} {end}")
        growth = []
        for key in lived:
            (rss0, fd0), (rss1, fd1) = warm[key], end[key]
            growth.append((rss1 - rss0, fd1 - fd0, key, rss0, rss1, fd0, fd1))
            print(f"soak {suite}: {key[0]} {key[2]} (pid {key[1]}): RSS {rss0 / 1024:.1f} ->"
                  f" {rss1 / 1024:.1f} MB, fds {fd0} -> {fd1}")  # fmt: skip
        # the shape tells a leak (a line) from a warm-up (a plateau)
        for key in [g[2] for g in sorted(growth, reverse=True)[:3]]:
            series = " ".join(f"{t / 60:.0f}m:{found[key][0] / 1024:.1f}"
                              for t, found in samples if key in found)  # fmt: skip
            print(f"soak {suite}: {key[0]} {key[2]} (pid {key[1]}) RSS MB over time: {series}")
        worst, fds = max(growth), max(g[1] for g in growth)
        print(f"soak {suite}: largest RSS growth after warm-up {worst[0] / 1024:.1f} MB"
              f" ({worst[2][2]} of {worst[2][0]}), largest fd growth {fds}"
              f" over {len(lived)} processes (target: flat)")  # fmt: skip


def main() -> None:
    if os.geteuid() != 0:
        print("bench_soak: needs root (boots machines)")
        return
    from tests.test_deb import _build

    for suite in SUITES:
        dist = ROOT / ".tmp" / f"soak-{suite}"
        if suite == "bookworm":
            deb = _build(["make", "deb", f"DIST={dist}"], dist)
        else:
            deb = _build([str(ROOT / "scripts/debian13.sh"), "run", "make", "deb",
                          f"DIST={dist}"], dist)  # fmt: skip
        soak(suite, deb)
