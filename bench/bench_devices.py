"""Idle devices (issue 27): what 1,000 / 5,000 / 10,000 of them cost a relay.

A `make run` relay (every component; metrics only with BENCH_METRICS=1, as they
are off by default) and fleets of idle devices
(testing.idlefleet: TLS IMAP, logged in, IDLE on INBOX; one process per
core).  At each level, once the devices had time to hibernate: PSS and RSS of
the relay's processes in total, per device above the empty relay and per
process kind, their file descriptors, and submit -> EXISTS to hibernated
devices while the others idle.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.bench_relay import pct, state_dir
from bench.proc import cpu_seconds
from chatmaild.relay import Relay
from chatmaild.relay.processes import process_tree
from chatmaild.relay.stack import available_components
from testing.imapidle import IdleClient, tcp_connections_held
from testing.mails import encrypted_message

ROOT = Path(__file__).resolve().parents[1]
LEVELS = tuple(int(n) for n in os.environ.get("BENCH_DEVICES", "1000 5000 10000").split())
FLEETS = 2  # processes of the load generator: one per core
SAMPLES = 10  # hibernated devices that get a message at each level
SETTLE = 5.0  # seconds past imap_hibernate_timeout before measuring
STORM = int(os.environ.get("BENCH_STORM", "1000"))  # devices reconnecting at once
STORM_SPREADS = tuple(float(s) for s in os.environ.get("BENCH_STORM_SPREADS", "0 5 10").split())
# ^ all at once, and within a few seconds


def relay_pids(relay: Relay) -> set[int]:
    pids: set[int] = set()
    for pidfile in relay.run_dir.glob("*.relay-pid"):
        try:
            pids |= process_tree(int(pidfile.read_text()))
        except (OSError, ValueError):
            continue
    return pids


def kind_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("dovecot/"):
        return first.split()[0]
    if "/" in first and not first.startswith("/"):  # a Dovecot instance's: "NAME/lmtp ..."
        return "dovecot " + first.split()[0].rsplit("/", 1)[1]
    if b"-m" in argv[:-1]:  # our daemons: python3 -s -P -m MODULE
        return argv[argv.index(b"-m") + 1].decode(errors="replace")
    for arg in argv:
        text = arg.decode(errors="replace")
        if "/bin/" in text and not text.endswith("python3"):
            return Path(text).name
    return Path(first).name


def memory(pids: set[int]) -> dict[str, list[int]]:
    """kind -> [pss kB, rss kB, processes, fds]"""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            pss = next(int(x.split()[1]) for x in rollup if x.startswith("Pss:"))
            rss = next(int(x.split()[1]) for x in rollup if x.startswith("Rss:"))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration):
            continue
        entry = out[kind_of(pid)]
        entry[0] += pss
        entry[1] += rss
        entry[2] += 1
        entry[3] += fds
    return out


def totals(mem: dict[str, list[int]]) -> tuple[int, int, int]:
    return (sum(v[0] for v in mem.values()), sum(v[1] for v in mem.values()),
            sum(v[3] for v in mem.values()))  # fmt: skip


def start_fleet(relay: Relay, accounts: list[tuple[str, str]], workdir: Path, first: int,
                at_once: int | None = None, spread: float = 0.0):  # fmt: skip
    """A fleet of ``accounts``' devices against ``relay``'s port 993 (fleet_process)."""
    return fleet_process(relay.host, int(relay.ports["imaps"]), accounts, workdir, first,
                         at_once=at_once, spread=spread)  # fmt: skip


def fleet_process(host: str, port: int, accounts: list[tuple[str, str]], workdir: Path,
                  first: int, at_once: int | None = None, spread: float = 0.0,
                  wrap=lambda argv: argv):  # fmt: skip
    """A fleet of ``accounts``' devices; ``first``: the first one's source address;
    ``at_once``: connections in flight (default: idlefleet's); ``spread``: seconds
    over which the devices start, each at a random moment; ``wrap``: the argv in
    another network namespace (Machine.netns_argv)."""
    path = workdir / f"fleet-{len(list(workdir.iterdir()))}.txt"
    path.write_text("".join(f"{a} {p}\n" for a, p in accounts))
    env = dict(os.environ)
    if at_once:
        env["IDLEFLEET_AT_ONCE"] = str(at_once)
    env["IDLEFLEET_SPREAD"] = str(spread)
    return subprocess.Popen(
        wrap([sys.executable, "-m", "testing.idlefleet", host, str(port), str(path), str(first)]),
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def end_fleets(fleets: list[subprocess.Popen]) -> None:
    """Close each fleet's input (its devices log out) and wait for it; kill what hangs."""
    for proc in fleets:
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_by_kind(pids: set[int]) -> dict[str, float]:
    """kind -> CPU seconds so far; what ended processes used is counted under
    their parent's kind + " (ended children)" (Dovecot's master waits for them)"""
    out: dict[str, float] = defaultdict(float)
    for pid in pids:
        try:
            own, reaped = cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue
        kind = kind_of(pid)
        out[kind] += own
        if reaped:
            out[kind + " (ended children)"] += reaped
    return out


def imap_processes_gone(relay: Relay, timeout: float = 40.0) -> int:
    """Wait until the imap processes whose clients all hibernated have ended (each
    serves up to 10 and ends after idle_kill, 10 s, with none): what an idle relay
    is.  How many are left at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in relay_pids(relay) if kind_of(p) == "dovecot imap"]
        if not left or time.monotonic() > deadline:
            return len(left)
        time.sleep(1)


def reconnect_storm(relay: Relay, workdir: Path, first: int, spread: float) -> None:
    """STORM devices, known to the relay, all coming back within ``spread`` seconds
    (a restart, a network blip): how many get in, and their login times."""
    accounts = [relay.new_credentials() for _ in range(STORM)]
    fleets = [start_fleet(relay, accounts[i::FLEETS], workdir, first + i * STORM)
              for i in range(FLEETS)]  # fmt: skip
    for proc in fleets:  # the accounts exist now, as after a restart
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.communicate(timeout=120)
    time.sleep(float(relay.config.imap_hibernate_timeout) + SETTLE)
    cpu_before = cpu_by_kind(relay_pids(relay))
    fleets = [start_fleet(relay, accounts[i::FLEETS], workdir, first + i * STORM,
                          at_once=STORM, spread=spread) for i in range(FLEETS)]  # fmt: skip
    ok = bad = 0
    lines = []
    for proc in fleets:
        assert proc.stdout is not None
        _, good, failed, secs, p50, p99, *why = proc.stdout.readline().split(" ", 6)
        ok, bad = ok + int(good), bad + int(failed)
        lines.append(f"{secs} s, login p50 {p50} ms, p99 {p99} ms {' '.join(why).strip()}")
    print(
        f"reconnect storm: {STORM} devices within {spread:.0f} s: {ok} back in, {bad} refused; "
        + "; ".join(lines)
        + " (target: none refused, login p99 < 1000 ms)"
    )
    cpu_after = cpu_by_kind(relay_pids(relay))
    used = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_after.items()}
    top = sorted(((v, k) for k, v in used.items() if v > 0.05), reverse=True)
    print(
        f"  relay CPU per login: {sum(used.values()) / max(ok, 1) * 1000:.1f} ms ("
        + ", ".join(f"{k} {v / max(ok, 1) * 1000:.1f}" for v, k in top)
        + ")"
    )
    for proc in fleets:
        proc.communicate(timeout=120)


def front_capacity(relay: Relay) -> int | None:
    """How many mail connections the web process (port 993's IMAP front) says its
    open-files limit holds, when fewer than max_imap_connections."""
    log = (relay.log_dir / "newemail.log").read_text(errors="replace")
    found = re.search(r"holds (\d+) IMAP/SMTP connections", log)
    return int(found.group(1)) if found else None


def hibernated_latencies(relay: Relay, hibernate_after: float) -> list[float]:
    sender, spw = relay.new_credentials()
    clients = []
    for _ in range(SAMPLES):
        addr, pw = relay.new_credentials()
        clients.append((addr, IdleClient(relay.host, int(relay.ports["imaps"]), addr, pw)))
    for _, client in clients:
        client.idle()
    time.sleep(hibernate_after + 2)
    out = []
    try:
        with relay.smtp(sender, spw) as smtp:
            for addr, client in clients:
                t0 = time.monotonic()
                smtp.sendmail(sender, [addr], encrypted_message(sender, [addr], size=3000))
                client.wait_exists(timeout=30)
                out.append((time.monotonic() - t0) * 1000)
    finally:
        for _, client in clients:
            client.close()
    return out


def main() -> None:
    if os.geteuid() != 0:
        print("bench_devices: needs root (starts Postfix and Dovecot)")
        return
    d = state_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    fleets: list[subprocess.Popen] = []
    # the web process (port 993's IMAP front) holds two descriptors per device: its
    # pages' share kept small, for more devices under this machine's open-files limit
    # the load generator shares the machine: its load must not close registration
    # (max_load_1m) for the devices' first logins, which create their accounts
    overrides = {"max_user_send_per_minute": 6000, "max_user_send_burst_size": 6000,
                 "web_max_connections": 64, "max_load_1m": 1000}  # fmt: skip
    try:
        # the default configuration: metrics off (make run turns them on; with them,
        # Dovecot's stats process keeps what every login's events cost it: README)
        parts = set(available_components())
        if not os.environ.get("BENCH_METRICS"):
            parts.discard("metrics")
        with Relay(d, overrides, parts) as relay:
            hibernate_after = float(relay.config.imap_hibernate_timeout)
            time.sleep(2)
            base_pss, base_rss, base_fds = totals(memory(relay_pids(relay)))
            print(f"idle devices 0: relay PSS {base_pss / 1024:.1f} MB, RSS {base_rss / 1024:.1f}"
                  f" MB, {base_fds} fds")  # fmt: skip
            connected = issued = 0
            capacity = front_capacity(relay)
            for level in LEVELS:
                if capacity is not None and level > capacity - SAMPLES - 1:
                    # room left for the latency samples' own connections
                    print(f"idle devices {level}: {capacity - SAMPLES - 1} instead: the web "
                          f"process's open-files limit holds {capacity} IMAP connections "
                          "here (an installed relay's unit: LimitNOFILE=65536)")  # fmt: skip
                    level = capacity - SAMPLES - 1
                new = level - connected
                accounts = [relay.new_credentials() for _ in range(new)]
                share = -(-new // FLEETS)
                started = [start_fleet(relay, accounts[i : i + share], work, issued + i)
                           for i in range(0, new, share)]  # fmt: skip
                issued += new
                fleets += started
                failed, took = 0, 0.0
                for proc in started:
                    assert proc.stdout is not None
                    _, ok, bad, secs, _p50, _p99, *why = proc.stdout.readline().split(" ", 6)
                    connected += int(ok)
                    failed += int(bad)
                    took = max(took, float(secs))
                    if int(bad):
                        print(f"  failures: {' '.join(why).strip()}")
                time.sleep(hibernate_after + SETTLE)
                left = imap_processes_gone(relay)
                mem = memory(relay_pids(relay))
                pss, rss, fds = totals(mem)
                per = (pss - base_pss) / max(connected, 1)
                print(f"idle devices {level}: {connected} connected, {failed} failed, in"
                      f" {took:.0f} s; relay PSS {pss / 1024:.1f} MB ({per:.1f} KB per device"
                      f" above the empty relay; target <= 50), RSS {rss / 1024:.1f} MB,"
                      f" {fds} fds")  # fmt: skip
                top = sorted(mem.items(), key=lambda kv: -kv[1][0])[:6]
                if left:
                    print(f"  ({left} imap processes without clients not yet ended)")
                print("  by kind: " + ", ".join(
                    f"{k} {v[0] / 1024:.1f} MB PSS in {v[2]}" for k, v in top))  # fmt: skip
                lat = hibernated_latencies(relay, hibernate_after)
                p50, p99 = pct(lat, 50), pct(lat, 99)
                print(f"  submit -> EXISTS to a hibernated device ({SAMPLES}): p50 {p50:.1f} ms,"
                      f" p99 {p99:.1f} ms (targets 50 / 250)")  # fmt: skip
            # the storms last, once the levels' devices are gone: what a storm leaves
            # behind (auth workers until their idle_kill, imap-login's heap) is not
            # counted as the devices' memory above
            for proc in fleets:
                proc.communicate(timeout=120)
            fleets.clear()
            for n, spread in enumerate(STORM_SPREADS):  # addresses apart from the levels'
                reconnect_storm(relay, work, 200_000 + 10 * STORM * n, spread)
            # the last devices' LOGOUTs wake an imap process each: let them end before
            # the relay stops (else its stop finds thousands of them starting)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(
                kind_of(pid) == "dovecot imap" and tcp_connections_held(pid)
                for pid in relay_pids(relay)
            ):
                time.sleep(0.5)
    finally:
        end_fleets(fleets)
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
