"""filtermail against real Postfix + Dovecot on loopback, TLS submission.

Figures (issue 3):
- submission throughput of ~4 KB encrypted messages over 4 parallel implicit-TLS
  connections, with filtermail as proxy filter and with the filter bypassed
  (same stack without filtermail), and their ratio (target >= 0.9);
- the same with 128 KB messages through filtermail (target >= 150 msg/s);
- filtermail (outgoing) peak RSS while 10 x 25 MB messages are submitted at once
  (target <= 1.5 x bytes in flight + 40 MB).
Messages go to a local recipient, so each one is also delivered over LMTP.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from chatmaild.relay.stack import Relay
from chatmaild.testing import mails

BASE = ["postfix", "dovecot", "doveauth"]
CONNECTIONS = 4


def _vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _accounts(relay: Relay, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        addr, pw = relay.new_credentials()
        relay.imap(addr, pw).logout()
        out.append((addr, pw))
    return out


def _count_delivered(relay: Relay, addr: str) -> int:
    home = Path(relay.config.mailboxes_dir) / addr
    return sum(1 for p in home.rglob("*") if p.is_file() and p.parent.name in ("new", "cur"))


def _send_parallel(relay: Relay, senders, rcpt: str, size: int, per_conn: int) -> float:
    """Seconds until every message was accepted (250) over len(senders) connections."""
    payloads = [mails.encrypted_message(addr, [rcpt], size=size) for addr, _ in senders]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(senders) + 1)

    def worker(i: int) -> None:
        addr, pw = senders[i]
        try:
            with relay.smtp(addr, pw) as conn:
                barrier.wait()
                for _ in range(per_conn):
                    conn.sendmail(addr, [rcpt], payloads[i])
        except BaseException as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(senders))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    if errors:
        raise errors[0]
    return elapsed


def _wait_delivered(relay: Relay, addr: str, count: int, timeout: float = 120) -> float:
    start = time.monotonic()
    while _count_delivered(relay, addr) < count:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"only {_count_delivered(relay, addr)} of {count} delivered")
        time.sleep(0.05)
    return time.monotonic() - start


def _throughput(components: list[str], size: int, total: int, root: Path) -> tuple[float, float]:
    """(accepted msg/s, accepted-and-delivered msg/s)."""
    overrides = {"max_user_send_per_minute": 10**6, "max_user_send_burst_size": 10**6}
    with Relay(root / "-".join(components), overrides, components=components) as relay:
        senders = _accounts(relay, CONNECTIONS)
        ((rcpt, _),) = _accounts(relay, 1)
        _send_parallel(relay, senders, rcpt, size, 5)  # warm up (pools, processes)
        _wait_delivered(relay, rcpt, 5 * CONNECTIONS)
        per_conn = total // CONNECTIONS
        accepted = _send_parallel(relay, senders, rcpt, size, per_conn)
        extra = _wait_delivered(relay, rcpt, (5 + per_conn) * CONNECTIONS)
        n = per_conn * CONNECTIONS
        return n / accepted, n / (accepted + extra)


def _peak_rss(root: Path, size: int = 25 * 2**20, parallel: int = 10) -> tuple[float, float]:
    """(peak RSS MB of filtermail outgoing, bytes in flight MB)."""
    overrides = {"max_user_send_per_minute": 10**6, "max_user_send_burst_size": 10**6}
    with Relay(root / "rss", overrides, components=[*BASE, "filtermail"]) as relay:
        pid = relay._procs["filtermail"].pid
        senders = _accounts(relay, parallel)
        ((rcpt, _),) = _accounts(relay, 1)
        _send_parallel(relay, senders, rcpt, size, 1)
        peak_kb = _vm_kb(pid, "VmHWM")
        # drop the delivered 250 MB right away, the bench is about memory not disk
        shutil.rmtree(Path(relay.config.mailboxes_dir) / rcpt, ignore_errors=True)
        in_flight = parallel * len(mails.encrypted_message("a@b.c", ["d@e.f"], size=size))
        return peak_kb / 1024, in_flight / 2**20


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-filtermail-", dir="/tmp"))
    root.chmod(0o755)
    try:
        bypass, bypass_dlv = _throughput(BASE, 4096, 800, root)
        filt, filt_dlv = _throughput([*BASE, "filtermail"], 4096, 800, root)
        print(f"submit_4k_bypass: {bypass:.1f} msg/s (delivered {bypass_dlv:.1f} msg/s)")
        print(f"submit_4k_filtermail: {filt:.1f} msg/s (delivered {filt_dlv:.1f} msg/s)")
        print(f"submit_4k_ratio: {filt / bypass:.2f} x (target >= 0.9)")
        print(f"delivered_4k_ratio: {filt_dlv / bypass_dlv:.2f} x")
        big, big_dlv = _throughput([*BASE, "filtermail"], 128 * 1024, 400, root)
        print(f"submit_128k_filtermail: {big:.1f} msg/s (target >= 150; delivered {big_dlv:.1f})")
        peak, flight = _peak_rss(root)
        target = 1.5 * flight + 40
        print(f"filtermail_peak_rss_10x25MB: {peak:.0f} MB (in flight {flight:.0f} MB, "
              f"target <= {target:.0f} MB)")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
