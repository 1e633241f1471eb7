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

import os
import secrets
import string
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.bench_devices import end_fleets, fleet_process
from bench.packaged import POSTFIX, built_debs, installed, unit_processes

LEVELS = tuple(int(n) for n in os.environ.get("BENCH_DEVICES_PACKAGE", "1000 5000").split())
FLEETS = 2
HIBERNATE = 10  # imap_hibernate_timeout's default
UNITS = ["chatmail-dict.service", "filtermail.service", "chatmail-newemail.service",
         "dovecot.service", "coturn.service"]  # fmt: skip


def _pss_by_kind(m, units: list[str]) -> dict[str, list[int]]:
    """kind ("unit comm") -> [PSS KiB, processes]"""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for unit, _pid, comm, _rss, pss, _fds in unit_processes(m, units):
        entry = out[unit.split(".")[0] + " " + comm]
        entry[0] += pss
        entry[1] += 1
    return out


def _credentials(domain: str, n: int) -> list[tuple[str, str]]:
    alphabet = string.ascii_lowercase + string.digits
    return [("".join(secrets.choice(alphabet) for _ in range(9)) + "@" + domain,
             secrets.token_urlsafe(12)) for _ in range(n)]  # fmt: skip


def _imap_processes(m) -> int:
    return int(m.sh("grep -lx imap /proc/[0-9]*/comm 2>/dev/null | wc -l").strip())


def run(suite: str, deb: Path) -> None:
    from tests.test_deb import DOMAIN

    units = [*UNITS, POSTFIX[suite]]
    with installed(suite, deb) as m, tempfile.TemporaryDirectory(prefix="devices-") as tmp:
        time.sleep(5)
        base = sum(v[0] for v in _pss_by_kind(m, units).values())
        print(f"package {suite}: empty relay PSS {base / 1024:.1f} MB", flush=True)
        fleets = []
        connected = issued = 0
        try:
            for level in LEVELS:
                accounts = _credentials(DOMAIN, level - connected)
                share = -(-len(accounts) // FLEETS)
                started = [fleet_process("127.0.0.1", 993, accounts[i : i + share], Path(tmp),
                                         issued + i, wrap=m.netns_argv)
                           for i in range(0, len(accounts), share)]  # fmt: skip
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
                mem = _pss_by_kind(m, units)
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
            end_fleets(fleets)


def main() -> None:
    if os.geteuid() != 0:
        print("bench_devices_package: needs root (boots machines)")
        return
    for suite, deb in built_debs("devices"):
        run(suite, deb)
