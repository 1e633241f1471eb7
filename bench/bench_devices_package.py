"""Idle devices on the installed package (issue 27, item 1: "make run and the
package alike").

For each release (BENCH_SOAK_SUITES' machines, default "bookworm trixie"): the
package of this checkout on a freshly booted machine under systemd, then fleets
of idle devices (testing.idlefleet: TLS IMAP on 993, LOGIN, which creates the
account, SELECT, IDLE; one process per core, in the machine's network
namespace) at BENCH_DEVICES_PACKAGE levels (default "1000 5000").  Once the
devices had time to hibernate and the imap processes without clients ended:
PSS of every process of the relay's units (our daemons, Dovecot, Postfix,
coturn), per device above the empty relay (target <= 50 KB), and the largest
process kinds.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = tuple(int(n) for n in os.environ.get("BENCH_DEVICES_PACKAGE", "1000 5000").split())
SUITES = os.environ.get("BENCH_SOAK_SUITES", "bookworm trixie").split()
FLEETS = 2
HIBERNATE = 10  # imap_hibernate_timeout's default
UNITS = ["chatmail-dict.service", "filtermail.service", "chatmail-newemail.service",
         "dovecot.service", "coturn.service"]  # fmt: skip
POSTFIX = {"bookworm": "postfix@-.service", "trixie": "postfix.service"}
# inside the machine: kind -> [PSS kB, processes] over every process of the units
MEASURE = r"""
import collections, json, subprocess
out = collections.defaultdict(lambda: [0, 0])
for unit in UNITS:
    group = subprocess.run(["systemctl", "show", "-p", "ControlGroup", "--value", unit],
                           capture_output=True, text=True).stdout.strip()
    pids = []
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"):
        try:
            pids = open(f"{root}{group}/cgroup.procs").read().split()
            break
        except OSError:
            continue
    for pid in pids:
        try:
            pss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup")
                       if l.startswith("Pss:"))
            kind = unit.split(".")[0] + " " + open(f"/proc/{pid}/comm").read().strip()
        except (OSError, StopIteration, IndexError):
            continue
        out[kind][0] += pss
        out[kind][1] += 1
print(json.dumps(out))
"""


def _measure(m, units: list[str]) -> dict[str, list[int]]:
    return json.loads(m.sh("python3 - <<'EOF'\nUNITS = " + json.dumps(units) + MEASURE + "EOF\n"))


def _credentials(domain: str, n: int) -> list[tuple[str, str]]:
    alphabet = string.ascii_lowercase + string.digits
    return [("".join(secrets.choice(alphabet) for _ in range(9)) + "@" + domain,
             secrets.token_urlsafe(12)) for _ in range(n)]  # fmt: skip


def _imap_processes(m) -> int:
    return int(m.sh("grep -lx imap /proc/[0-9]*/comm 2>/dev/null | wc -l").strip())


def run(suite: str, deb: Path) -> None:
    from testing.machine import Machine
    from tests import deb_load
    from tests.test_deb import DOMAIN, _units_active

    units = [*UNITS, POSTFIX[suite]]
    with Machine(suite, binds={str(deb.parent): "/debs", str(ROOT): str(ROOT)}) as m, \
            tempfile.TemporaryDirectory(prefix="devices-") as tmp:  # fmt: skip
        m.sh(f"echo 'chatmaild chatmaild/mail_domain string {DOMAIN}' | debconf-set-selections")
        m.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q /debs/{deb.name} 2>&1",
             timeout=900)  # fmt: skip
        deb_load.lift_limits(m)
        _units_active(m)
        time.sleep(5)
        empty = _measure(m, units)
        base = sum(v[0] for v in empty.values())
        print(f"package {suite}: empty relay PSS {base / 1024:.1f} MB", flush=True)
        fleets: list[subprocess.Popen] = []
        connected = issued = 0
        try:
            for level in LEVELS:
                accounts = _credentials(DOMAIN, level - connected)
                share = -(-len(accounts) // FLEETS)
                started = []
                for i in range(0, len(accounts), share):
                    path = Path(tmp) / f"fleet-{issued + i}.txt"
                    path.write_text("".join(f"{a} {p}\n" for a, p in accounts[i : i + share]))
                    started.append(subprocess.Popen(
                        m.netns_argv([sys.executable, "-m", "testing.idlefleet", "127.0.0.1",
                                      "993", str(path), str(issued + i)]),
                        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    ))  # fmt: skip
                issued += len(accounts)
                fleets += started
                failed = 0
                for proc in started:
                    assert proc.stdout is not None
                    _, ok, bad, *_ = proc.stdout.readline().split(" ", 6)
                    connected, failed = connected + int(ok), failed + int(bad)
                time.sleep(HIBERNATE + 5)
                deadline = time.monotonic() + 40  # imap processes without clients end
                while _imap_processes(m) and time.monotonic() < deadline:
                    time.sleep(1)
                mem = _measure(m, units)
                pss = sum(v[0] for v in mem.values())
                print(f"package {suite}: idle devices {level}: {connected} connected, {failed}"
                      f" failed; relay PSS {pss / 1024:.1f} MB,"
                      f" {(pss - base) / max(connected, 1):.1f} KB per device above the empty"
                      f" relay (target <= 50); imap processes left {_imap_processes(m)}",
                      flush=True)  # fmt: skip
                top = sorted(mem.items(), key=lambda kv: -kv[1][0])[:6]
                print("  by kind: " + ", ".join(f"{k} {v[0] / 1024:.1f} MB PSS in {v[1]}"
                                                for k, v in top), flush=True)  # fmt: skip
        finally:
            for proc in fleets:
                try:
                    proc.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main() -> None:
    if os.geteuid() != 0:
        print("bench_devices_package: needs root (boots machines)")
        return
    from tests.test_deb import _build

    for suite in SUITES:
        dist = ROOT / ".tmp" / f"devices-{suite}"
        if suite == "bookworm":
            deb = _build(["make", "deb", f"DIST={dist}"], dist)
        else:
            deb = _build([str(ROOT / "scripts/debian13.sh"), "run", "make", "deb",
                          f"DIST={dist}"], dist)  # fmt: skip
        run(suite, deb)
