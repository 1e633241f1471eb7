"""Push notifications: LMTP delivery -> POST latency, queue recovery, idle RSS.

1. A relay (real Postfix + Dovecot with the Lua push hook, doveauth,
   chatmail-metadata, chatmail-lastlogin) and a loopback HTTP sink.  Accounts
   are created over IMAP and get one device token each; messages are then
   delivered over Dovecot's LMTP socket on an open-loop schedule of
   BENCH_PUSH_RATE deliveries/s (default 200) for BENCH_PUSH_SECONDS (10 s),
   round-robin over the accounts.  Latency is from the start of the LMTP
   transaction to the arrival of the POST at the sink (so it includes the
   delivery itself); the k-th POST of a token is matched with the k-th delivery
   to its account.
2. BENCH_PUSH_QUEUED (10,000) notification files for distinct tokens are put
   into the queue directory of a stopped chatmail-metadata; the figure is the
   time from starting the daemon until every one was POSTed and its file gone.
3. Resident memory of both dict daemons after start, idle.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.proc import pss_mb, rss_mb
from chatmaild.common.config import read_config, write_config
from chatmaild.dictd.push import encode_pending
from chatmaild.relay import Relay
from testing.dictclient import DictClient
from testing.httpsink import SinkProcess

RATE = float(os.environ.get("BENCH_PUSH_RATE", "200"))
SECONDS = float(os.environ.get("BENCH_PUSH_SECONDS", "10"))
ACCOUNTS = int(os.environ.get("BENCH_PUSH_ACCOUNTS", "40"))
QUEUED = int(os.environ.get("BENCH_PUSH_QUEUED", "10000"))
LMTP_THREADS = 6
TARGET_P99_MS = 50
TARGET_RECOVERY_S = 5
TARGET_RSS_MB = 40


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# ---------------------------------------------------------------- 1. latency


def bench_latency(sink: SinkProcess, tmp: Path) -> None:
    state = tmp / "relay"
    state.mkdir(mode=0o755)
    relay = Relay(
        state,
        {"notification_url": sink.url},
        ("postfix", "dovecot", "doveauth", "lastlogin", "metadata"),
    )
    with relay:
        accounts = []
        for i in range(ACCOUNTS):
            addr, password = relay.new_credentials()
            relay.imap(addr, password).logout()  # creates the account and its home
            accounts.append((addr, f"bench-token-{i:04d}"))
        with DictClient(relay.config.metadata_socket) as c:
            for addr, token in accounts:
                assert c.set(addr, "priv/0/devicetoken", token).startswith("O")

        total = int(RATE * SECONDS)
        # per token: (LMTP transaction start, end) of each delivery, in order
        sent: dict[str, list[tuple[float, float]]] = {token: [] for _, token in accounts}
        lock = threading.Lock()
        counter = iter(range(total))
        lateness: list[float] = []
        durations: list[float] = []
        start = time.time() + 0.5

        def worker() -> None:
            lmtp = smtplib.LMTP(str(relay.ports["lmtp"]))
            try:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    addr, token = accounts[i % len(accounts)]
                    due = start + i / RATE
                    delay = due - time.time()
                    if delay > 0:
                        time.sleep(delay)
                    msg = (
                        f"From: <sender@elsewhere.example>\r\nTo: <{addr}>\r\n"
                        f"Subject: [...]\r\nMessage-ID: <{i}@bench>\r\n\r\nbody {i}\r\n"
                    )
                    t0 = time.time()
                    lateness.append(max(0.0, t0 - due))
                    lmtp.sendmail("sender@elsewhere.example", [addr], msg)
                    t1 = time.time()
                    durations.append(t1 - t0)
                    with lock:
                        sent[token].append((t0, t1))
            finally:
                lmtp.quit()

        threads = [threading.Thread(target=worker) for _ in range(LMTP_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - start
        sink.wait_count(total, 30)

        latencies: list[float] = []
        after_delivery: list[float] = []
        by_token: dict[str, list[float]] = {}
        all_posts = sink.posts()
        for post in all_posts:
            by_token.setdefault(post.token, []).append(post.at)
        for token, times in sent.items():
            times.sort()
            arrivals = sorted(by_token.get(token, []))
            for (t0, t1), arrived in zip(times, arrivals, strict=False):
                latencies.append((arrived - t0) * 1000)
                after_delivery.append(max(0.0, arrived - t1) * 1000)
        posts = len(all_posts)
        print(f"push deliveries: {total} count")
        print(f"push delivery rate achieved: {total / elapsed:.0f} per_s (asked {RATE:.0f})")
        print(f"push posts received: {posts} count")
        print(f"push lmtp sender lateness p99: {percentile(lateness, 99) * 1000:.1f} ms")
        print(f"push lmtp transaction p50: {statistics.median(durations) * 1000:.1f} ms")
        print(f"push lmtp transaction p99: {percentile(durations, 99) * 1000:.1f} ms")
        if latencies:
            print(f"push latency p50: {statistics.median(latencies):.1f} ms")
            print(
                f"push latency p99: {percentile(latencies, 99):.1f} ms (target <= {TARGET_P99_MS})"
            )
            print(f"push latency max: {max(latencies):.1f} ms")
            # the part after LMTP answered (the POST often arrives before that)
            print(f"push latency after lmtp reply p99: {percentile(after_delivery, 99):.1f} ms")
        metadata_pid = relay.proc_of("metadata").pid
        print(f"metadata rss after load: {rss_mb(metadata_pid):.1f} MB")


# ---------------------------------------------------------------- 2. recovery, 3. RSS


def start_daemon(module: str, ini: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as logf:
        return subprocess.Popen(
            [sys.executable, "-m", f"chatmaild.dictd.{module}", "--config", str(ini)],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )


def bench_recovery_and_rss(sink: SinkProcess, tmp: Path) -> None:
    mailboxes = tmp / "mail"
    mailboxes.mkdir()
    ini = write_config(
        tmp / "chatmail.ini",
        mail_domain="bench.example",
        mailboxes_dir=mailboxes,
        metadata_socket=tmp / "metadata.sock",
        lastlogin_socket=tmp / "lastlogin.sock",
        notification_url=sink.url,
    )
    config = read_config(ini)

    # idle RSS of both daemons
    procs = {
        "metadata": start_daemon("metadata", ini, tmp / "metadata.log"),
        "lastlogin": start_daemon("lastlogin", ini, tmp / "lastlogin.log"),
    }
    try:
        DictClient.wait(config.metadata_socket).close()
        DictClient.wait(config.lastlogin_socket).close()
        time.sleep(1.0)
        total = pss = 0.0
        for name, proc in procs.items():
            mb = rss_mb(proc.pid)
            total += mb
            pss += pss_mb(proc.pid)
            print(f"{name} rss idle: {mb:.1f} MB (target < {TARGET_RSS_MB})")
        print(f"metadata+lastlogin rss idle: {total:.1f} MB")
        print(f"metadata+lastlogin pss idle: {pss:.1f} MB")
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    # queue of QUEUED notifications, distinct tokens (no coalescing can help)
    queue = Path(config.notification_dir)
    queue.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for i in range(QUEUED):
        addr = f"user{i // 10:05d}@bench.example"
        (queue / f"{i:032x}").write_bytes(encode_pending(addr, now, f"queued-token-{i:05d}"))
    sink.clear()
    t0 = time.monotonic()
    proc = start_daemon("metadata", ini, tmp / "metadata.log")
    try:
        ok = sink.wait_count(QUEUED, 120)
        posted = time.monotonic() - t0
        while any(queue.iterdir()) and time.monotonic() - t0 < 120:
            time.sleep(0.01)
        emptied = time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(f"queued notifications: {QUEUED} count")
    if not ok:
        print(f"queue recovery: FAILED, {sink.count()} of {QUEUED} posted")
        return
    print(f"queue recovery all posted: {posted:.2f} s (target < {TARGET_RECOVERY_S})")
    print(f"queue recovery queue empty: {emptied:.2f} s")
    print(f"queue recovery rate: {QUEUED / posted:.0f} per_s")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-push-", dir="/tmp"))
    tmp.chmod(0o755)
    # other work on the machine shows up in every figure here: say how busy it was
    print(f"push bench load1 at start: {os.getloadavg()[0]:.2f} load")
    try:
        with SinkProcess() as sink:
            bench_recovery_and_rss(sink, tmp)
            sink.clear()
            bench_latency(sink, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
