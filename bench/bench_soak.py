"""A long run of the packaged relay under systemd (issue 24, item 5).

For each release (BENCH_SOAK_SUITES, default "bookworm trixie"): the package of
this checkout installed on a freshly booted machine (tests/test_deb.py's), then
BENCH_SOAK_SECONDS (default 3600) of load from tests/deb_load.py in its network
namespace: encrypted mail submitted over 465 at BENCH_SOAK_RATE messages a
second (default 5) to three recipients with push tokens, a login every second,
a new account with a push token every 10 s; port 25 in and out with another
domain (bench/soakpeer.py, in a network namespace of its own joined to the
machine's by a veth pair): every fifth message goes to it, and it sends a
DKIM-signed message a second to the recipients.  Every BENCH_SOAK_EVERY seconds
(default 60) each process of the relay's units is sampled: RSS, open file
descriptors.  Afterwards the queue is drained and every INBOX read.

Prints per release: messages accepted, delivered, lost, delivered twice (local,
port 25 in, port 25 out with the peer's DKIM check of the relay's signature); accounts
made and their tokens; restarts of every unit (target 0); and for every process
that lived through the run, its RSS and descriptors after warm-up (the first
sample after a tenth of the run) and at the end: the largest growth (target:
flat).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench.packaged import POSTFIX, built_debs, installed, unit_processes

ROOT = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("BENCH_SOAK_SECONDS", "3600"))
EVERY = float(os.environ.get("BENCH_SOAK_EVERY", "60"))
RATE = os.environ.get("BENCH_SOAK_RATE", "5")
UNITS = ["chatmail-dict.service", "filtermail.service", "chatmail-newemail.service",
         "dovecot.service"]  # fmt: skip
# the veth pair's ends: public-looking (the relay delivers to no private address),
# seen by nothing but the machine and the peer
RELAY_ADDRESS, PEER_ADDRESS = "11.8.0.1", "11.8.0.2"
PEER_RCPTS = "alice@peer.example,bob@peer.example"


def _sample(m, units: list[str]) -> dict[tuple[str, int, str], tuple[int, int]]:
    return {(unit, pid, comm): (rss, fds)
            for unit, pid, comm, rss, _pss, fds in unit_processes(m, units)}  # fmt: skip


def soak(suite: str, deb: Path) -> None:
    from tests import deb_load
    from tests.test_deb import DOMAIN, _show

    units = [*UNITS, POSTFIX[suite]]
    with installed(suite, deb) as m, tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        with _peer(m, work) as peer:
            env = {**os.environ, "LOAD_RATE": RATE, "LOAD_EXTRA": "1", "LOAD_REMOTE": PEER_RCPTS}
            with deb_load.running(m, work, DOMAIN, env) as load:
                start = time.monotonic()
                samples = []
                while (elapsed := time.monotonic() - start) < SECONDS:
                    time.sleep(min(EVERY, SECONDS - elapsed))
                    if load.poll() is not None:
                        raise RuntimeError("the load stopped: " + (load.stderr.read() or ""))
                    if peer.poll() is not None:
                        raise RuntimeError("the peer stopped: " + (peer.stderr.read() or ""))
                    samples.append((time.monotonic() - start, _sample(m, units)))
                (work / "stop").touch()  # the peer's sender too, before the queue drains
                _wait_file(work / "peer-stopped", 120)
            result = deb_load.stop_drain_count(m, work, load, drain=300)
            out = _count_out(work)
        print(f"soak {suite}: {SECONDS:.0f} s: {result['accepted']} accepted,"
              f" {result['delivered']} delivered, {result['lost']} lost,"
              f" {result['twice']} delivered twice (target: 0 lost, 0 twice);"
              f" {result['created']} accounts made, {result['tokens']} tokens kept"
              f" of {result['created'] + 3}; errors {result['errors']}")  # fmt: skip
        errors_in = json.loads((work / "errors-in.json").read_text())
        print(f"soak {suite}: port 25 in: {result['in_accepted']} accepted,"
              f" {result['in_delivered']} delivered, {result['in_lost']} lost,"
              f" {result['in_twice']} delivered twice; errors {errors_in}")  # fmt: skip
        print(f"soak {suite}: port 25 out: {out['accepted']} accepted, {out['delivered']}"
              f" received by the peer, {out['lost']} lost, {out['twice']} twice,"
              f" DKIM {out['dkim']}")  # fmt: skip
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
        # processes that come and go (Dovecot's lmtp, replaced after 500 connections):
        # the largest of each name at warm-up and at the end
        pids_by_name: dict[tuple[str, str], set[int]] = defaultdict(set)
        for _, found in samples:
            for unit, pid, comm in found:
                pids_by_name[unit, comm].add(pid)
        for (unit, comm), pids in sorted(pids_by_name.items()):
            if len(pids) < 2:
                continue
            peak0, peak1 = (max((rss for (u, _, c), (rss, _) in found.items()
                                 if (u, c) == (unit, comm)), default=0)
                            for found in (warm, end))  # fmt: skip
            print(f"soak {suite}: {unit} {comm}: {len(pids)} processes over the run,"
                  f" the largest {peak0 / 1024:.1f} MB at warm-up, {peak1 / 1024:.1f} MB"
                  f" at the end")  # fmt: skip
        worst, fds = max(growth), max(g[1] for g in growth)
        print(f"soak {suite}: largest RSS growth after warm-up {worst[0] / 1024:.1f} MB"
              f" ({worst[2][2]} of {worst[2][0]}), largest fd growth {fds}"
              f" over {len(lived)} processes (target: flat)")  # fmt: skip


def _wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} did not appear within {timeout:.0f} s")
        time.sleep(0.5)


def _ip(*argv: str, wrap=lambda a: a) -> None:
    subprocess.run(wrap(["ip", *argv]), check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def _peer(m, work: Path):
    """bench/soakpeer.py in a network namespace of its own, joined to the machine's
    by a veth pair; the relay set up to reach it as an operator's would reach
    another domain (its resolver, its CA trusted, the MX name in /etc/hosts)."""
    from tests.test_deb import DOMAIN

    ns, tag = f"chatmaild-soak-{os.getpid()}", os.getpid() % 100000
    relay_end, peer_end = f"sk{tag}r", f"sk{tag}p"
    _ip("netns", "add", ns)
    peer = None
    try:
        _ip("link", "add", relay_end, "type", "veth", "peer", "name", peer_end)
        _ip("link", "set", peer_end, "netns", ns)
        _ip("link", "set", relay_end, "netns", str(m.leader))
        _ip("addr", "add", f"{RELAY_ADDRESS}/24", "dev", relay_end, wrap=m.netns_argv)
        _ip("link", "set", relay_end, "up", wrap=m.netns_argv)
        for args in (["link", "set", "lo", "up"], ["addr", "add", f"{PEER_ADDRESS}/24", "dev",
                     peer_end], ["link", "set", peer_end, "up"]):  # fmt: skip
            _ip("-n", ns, *args)
        peer = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.soakpeer", str(work),
             PEER_ADDRESS, RELAY_ADDRESS, DOMAIN],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        if not peer.stdout or peer.stdout.readline().strip() != "ready":
            raise RuntimeError("the peer did not start: " + (peer.stderr.read() or ""))
        ca = (work / "peer-ca.pem").read_text()
        ini = "/etc/chatmail/chatmail.ini"
        setup = m.sh(
            f"cat > /usr/local/share/ca-certificates/soak-peer.crt <<'EOF'\n{ca}EOF\n"
            "update-ca-certificates >/dev/null"
            f" && echo '{PEER_ADDRESS} mx.peer.example' >> /etc/hosts"
            f" && sed -i -E '/^dns_resolver *=/d' {ini}"
            f" && echo 'dns_resolver = {PEER_ADDRESS}:53' >> {ini}"
            " && chatmaild setup 2>&1 && systemctl restart filtermail.service"
        )  # fmt: skip
        record = next(line for line in setup.splitlines() if "._domainkey." in line)
        fields = shlex.split(record)
        name, txt = fields[0], "".join(fields[fields.index("TXT") + 1 :])
        (work / "relay-dkim").write_text(f"{name} {txt}\n")
        m.wait_for("systemctl is-active --quiet filtermail.service", 90)
        yield peer
    finally:
        if peer is not None:
            peer.terminate()
            try:
                peer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _count_out(work: Path) -> dict:
    """What the load sent to the peer and what the peer received, by Message-ID."""
    sent = [line.split()[1] for line in (work / "accepted").read_text().splitlines()
            if line.split()[0].endswith("@peer.example")]  # fmt: skip
    path = work / "received-out"
    received = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    seen = Counter(mid for _, mid, _ in received)
    return {
        "accepted": len(sent),
        "delivered": sum(seen[mid] > 0 for mid in sent),
        "lost": sum(seen[mid] == 0 for mid in sent),
        "twice": sum(max(seen[mid] - 1, 0) for mid in sent),
        "dkim": dict(Counter(result for _, _, result in received)),
    }


def main() -> None:
    if os.geteuid() != 0:
        print("bench_soak: needs root (boots machines)")
        return
    for suite, deb in built_debs("soak"):
        soak(suite, deb)
