"""Submission through filtermail as a milter against the proxy filter (issue 11, item 2).

Three relays on real Postfix + Dovecot, same machine, taking turns round by
round so that a noisy moment hits all of them:

- ``nofilter``: submission without any filter (the ceiling);
- ``proxy``: today's default, filtermail outgoing as submission's
  ``smtpd_proxy_filter`` re-injecting accepted mail into a second smtpd;
- ``milter``: the same handler as a milter in submission's own smtpd session
  (``smtpd_milters``, ``bench/alternatives/milter_filtermail.py``), no re-injection: the
  proxy relay's master.cf with the submission services' proxy filter swapped
  for the milter, Postfix reloaded.

Per stack and message size (4 KB and 128 KB encrypted mail to a local
recipient, over CONNECTIONS implicit-TLS submission connections): messages
per second until all are in the recipient's Maildir (and the rate Postfix
answered 250), the ratio to ``nofilter``, p50/p99 of the submission time of
one message (end of data to 250), and the CPU time of all the relay's
processes (Postfix, Dovecot, our daemons; not the load generator) per message.
Each figure is the median of ROUNDS rounds; the spread (min..max) of the
throughput is printed too.  The machine has 2 cores and is shared: read
ratios, not absolute rates.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_filtermail import BASE, FILTERED, UNLIMITED, _accounts, _wait_delivered
from chatmaild.relay.render import postfix_path
from chatmaild.relay.stack import Relay, _connectable
from testing import mails

CONNECTIONS = 4
ROUNDS = 5
SIZES = ((4096, 600), (128 * 1024, 200))  # message size, messages per round
TARGET = 0.9


def process_cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def relay_cpu_seconds(relay: Relay) -> float:
    """CPU of every relay process so far, exited children included (reaped: cutime)."""
    total = 0
    for pid in relay.running_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


class Stack:
    def __init__(self, state: Path, components: list[str], **params: object) -> None:
        self.relay = Relay(state, {**UNLIMITED, **params}, components=components)
        self.relay.start()
        self.senders = _accounts(self.relay, CONNECTIONS)

    def cpu_seconds(self) -> float:
        return relay_cpu_seconds(self.relay)

    def filter_pid(self) -> int | None:
        """filtermail outgoing (None without a filter)."""
        return self.relay.pid_of("filtermail")

    def round(self, size: int, total: int) -> dict[str, float | list[float]]:
        ((rcpt, _),) = _accounts(self.relay, 1)
        per_conn = total // CONNECTIONS
        payloads = [mails.encrypted_message(a, [rcpt], size=size) for a, _ in self.senders]
        latencies: list[list[float]] = [[] for _ in self.senders]
        errors: list[BaseException] = []
        barrier = threading.Barrier(CONNECTIONS + 1)

        def worker(i: int) -> None:
            addr, pw = self.senders[i]
            try:
                with self.relay.smtp(addr, pw) as conn:
                    barrier.wait()
                    for _ in range(per_conn):
                        start = time.perf_counter()
                        conn.sendmail(addr, [rcpt], payloads[i])
                        latencies[i].append(time.perf_counter() - start)
            except BaseException as e:  # reported below
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONNECTIONS)]
        for t in threads:
            t.start()
        barrier.wait()
        cpu_before = self.cpu_seconds()
        filter_pid = self.filter_pid()
        filter_before = process_cpu_seconds(filter_pid)
        start = time.monotonic()
        for t in threads:
            t.join()
        accepted = time.monotonic() - start
        if errors:
            raise errors[0]
        n = per_conn * CONNECTIONS
        delivered = accepted + _wait_delivered(self.relay, rcpt, n)
        cpu = self.cpu_seconds() - cpu_before
        filter_cpu = process_cpu_seconds(filter_pid) - filter_before
        lat = sorted(x for per in latencies for x in per)
        return {
            "delivered": n / delivered,
            "accepted": n / accepted,
            "p50": lat[len(lat) // 2] * 1e3,
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "cpu": cpu / n * 1e3,
            "filter_cpu": filter_cpu / n * 1e3,
        }

    def close(self) -> None:
        self.relay.stop()


class MilterStack(Stack):
    """The filtered relay with submission's proxy filter replaced by the bench milter."""

    def __init__(self, state: Path) -> None:
        super().__init__(state, FILTERED)
        self.milter: subprocess.Popen | None = None
        try:
            self.switch_to_milter()
        except BaseException:
            self.close()
            raise

    def filter_pid(self) -> int | None:
        return self.milter.pid if self.milter is not None else None

    def cpu_seconds(self) -> float:
        return relay_cpu_seconds(self.relay) + process_cpu_seconds(self.filter_pid())

    def switch_to_milter(self) -> None:
        c, queue = self.relay.config, self.relay.layout.postfix_queue_dir
        sock = str(Path(c.filtermail_smtp_socket).with_name("bench-milter.sock"))
        log = open(self.relay.log_dir / "bench-milter.log", "ab")  # noqa: SIM115
        ini = str(self.relay.ini_path)
        milter = "bench.alternatives.milter_filtermail"
        cmd = [sys.executable, "-m", milter, "--config", ini, "--socket", sock]
        self.milter = subprocess.Popen(cmd, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while not _connectable(sock):
            if self.milter.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("bench milter did not start")
            time.sleep(0.05)
        master = self.relay.layout.postfix_config_dir / "master.cf"
        text = master.read_text()
        proxy = f"  -o smtpd_proxy_filter=unix:{postfix_path(c.filtermail_smtp_socket, queue)}\n"
        if text.count(proxy) != 2:
            raise RuntimeError(f"{master}: not two submission services with {proxy.strip()}")
        milter = f"  -o smtpd_milters=unix:{postfix_path(sock, queue)}\n"
        master.write_text(text.replace(proxy, milter))
        subprocess.run(
            ["postfix", "-c", str(master.parent), "reload"], check=True, capture_output=True
        )
        time.sleep(2)  # smtpd processes of the old configuration finish their connection

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.milter is not None:
                self.milter.terminate()
                self.milter.wait(30)


def report(size: int, runs: dict[str, list[dict]]) -> None:
    kb = size // 1024

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base = med("nofilter", "delivered")
    for name, results in runs.items():
        rates = [r["delivered"] for r in results]
        print(
            f"submission_{kb}k_{name}: {med(name, 'delivered'):.1f} msg/s "
            f"(spread {min(rates):.1f}..{max(rates):.1f}; accepted at "
            f"{med(name, 'accepted'):.1f} msg/s), ratio {med(name, 'delivered') / base:.2f} x, "
            f"p50 {med(name, 'p50'):.1f} ms, p99 {med(name, 'p99'):.1f} ms, "
            f"relay CPU {med(name, 'cpu'):.2f} ms/msg "
            f"(filtermail outgoing {med(name, 'filter_cpu'):.2f})"
        )
    for name in ("proxy", "milter"):
        # ratio per round (the stacks ran back to back), then its median and range
        pairs = zip(runs[name], runs["nofilter"], strict=True)
        ratios = [p["delivered"] / b["delivered"] for p, b in pairs]
        print(
            f"submission_{kb}k_{name}_ratio: {statistics.median(ratios):.2f} x "
            f"(per round {min(ratios):.2f}..{max(ratios):.2f}; target >= {TARGET})"
        )


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-milter-", dir="/tmp"))
    root.chmod(0o755)
    stacks: dict[str, Stack] = {}
    try:
        stacks["nofilter"] = Stack(root / "nofilter", BASE)
        stacks["proxy"] = Stack(root / "proxy", FILTERED)
        stacks["milter"] = MilterStack(root / "milter")
        print(f"load before: {os.getloadavg()[0]:.2f} (1 min)", flush=True)
        for size, count in SIZES:
            for stack in stacks.values():  # warm up: processes, pools, caches
                stack.round(size, 40)
            runs: dict[str, list[dict]] = {name: [] for name in stacks}
            for _ in range(ROUNDS):
                for name, stack in stacks.items():
                    runs[name].append(stack.round(size, count))
            report(size, runs)
        print(f"load after: {os.getloadavg()[0]:.2f} (1 min)", flush=True)
    finally:
        for stack in stacks.values():
            stack.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
