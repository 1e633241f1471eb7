"""Relay figures: `make run` start/stop, submit -> IMAP IDLE EXISTS, Delta Chat latency.

Every figure names the Dovecot used ("stock" = Debian's 2.3 as is, "nodelay" =
with the LD_PRELOAD shim from dovecot/nodelay.c).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chatmaild.relay import Relay
from testing.imapidle import IdleClient
from testing.mails import encrypted_message

ROOT = Path(__file__).resolve().parents[1]
IDLE_SAMPLES = 30
DC_MESSAGES = 40
DC_GAP = 1.0  # the core's own SMTP rate limiter stalls back-to-back sends


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def state_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="bench-relay-", dir="/tmp"))
    d.chmod(0o755)
    return d


def bench_make_run() -> None:
    """Start the newcomer's relay as `make run` does (python -m chatmaild.relay)."""
    d = state_dir()
    try:
        starts, stops = [], []
        for _ in range(3):
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "chatmaild.relay", "--state", str(d)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                if " ready in " in line:
                    break
            else:
                raise RuntimeError(f"make run exited with {proc.wait()} before ready")
            starts.append(time.monotonic() - t0)
            t1 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
            stops.append(time.monotonic() - t1)
        # the first start also builds the shim and creates TLS/DKIM keys
        print(f"make run ready, first start: {starts[0] * 1000:.0f} ms")
        print(f"make run ready, later starts: {statistics.median(starts[1:]) * 1000:.0f} ms"
              " (target < 5000 ms)")  # fmt: skip
        print(f"make run stop: {statistics.median(stops) * 1000:.0f} ms")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def idle_latencies(relay: Relay, samples: int, asleep: float = 0.0) -> list[float]:
    sender, spw = relay.new_credentials()
    rcpt, rpw = relay.new_credentials()
    client = IdleClient(relay.host, int(relay.ports["imaps"]), rcpt, rpw)
    out = []
    try:
        with relay.smtp(sender, spw) as smtp:
            for _ in range(samples):
                msg = encrypted_message(sender, [rcpt], size=3000)
                client.idle()
                time.sleep(asleep)  # past imap_hibernate_timeout: the device hibernates
                t0 = time.monotonic()
                smtp.sendmail(sender, [rcpt], msg)
                client.wait_exists(timeout=10)
                out.append((time.monotonic() - t0) * 1000)
                client.done()
                time.sleep(0.05)
    finally:
        client.close()
    return out


def bench_idle() -> None:
    for label, nodelay in (("nodelay", True), ("stock", False)):
        d = state_dir()
        try:
            with Relay(d, {"max_user_send_per_minute": 6000}, nodelay=nodelay) as relay:
                lat = idle_latencies(relay, IDLE_SAMPLES if nodelay else 10)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        target = " (target p50 < 30 ms)" if nodelay else ""
        print(f"submit -> IDLE EXISTS p50, {label} Dovecot: {pct(lat, 50):.1f} ms{target}")
        print(f"submit -> IDLE EXISTS p90, {label} Dovecot: {pct(lat, 90):.1f} ms")


def dc_latencies(relay: Relay, count: int, gap: float, port443: bool = False) -> list[float]:
    from testing.dcclient import DCClients, securejoin, wait_event

    work = state_dir()
    clients = DCClients(work / "dc")
    try:
        a = clients.account(relay, port443=port443)
        b = clients.account(relay, port443=port443)
        securejoin(a, b)
        chat = a.create_chat(b)
        out = []
        for i in range(count):
            text = f"latency probe {i}"
            t0 = time.monotonic()
            chat.send_text(text)
            while True:
                ev = wait_event(b, lambda e: e["kind"] == "IncomingMsg", timeout=30)
                if b.get_message_by_id(ev["msgId"]).get_snapshot().text == text:
                    break
            out.append((time.monotonic() - t0) * 1000)
            time.sleep(gap)
        return out
    finally:
        clients.close()
        shutil.rmtree(work, ignore_errors=True)


def bench_hibernated() -> None:
    """Submit -> EXISTS to a device whose imap process hibernated (issue 27: p50 <= 50 ms,
    p99 <= 250 ms), next to an awake one, nodelay Dovecot."""
    d = state_dir()
    try:
        overrides = {"max_user_send_per_minute": 6000, "imap_hibernate_timeout": 1}
        with Relay(d, overrides, nodelay=True) as relay:
            awake = idle_latencies(relay, 20)
            asleep = idle_latencies(relay, 20, asleep=2.0)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    for label, lat in (("awake", awake), ("hibernated", asleep)):
        print(f"submit -> IDLE EXISTS, {label} device, {len(lat)} msgs: p50 {pct(lat, 50):.1f} ms, "
              f"p99 {pct(lat, 99):.1f} ms" + (" (target p50 <= 50, p99 <= 250 ms)"
                                              if label == "hibernated" else ""))  # fmt: skip


def bench_dc() -> None:
    for label, nodelay, count in (("nodelay", True, DC_MESSAGES), ("stock", False, 10)):
        d = state_dir()
        try:
            with Relay(d, {"max_user_send_per_minute": 6000}, nodelay=nodelay) as relay:
                lat = dc_latencies(relay, count, DC_GAP)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        goal = (" (target < 100 ms)", " (target < 150 ms)") if nodelay else ("", "")
        print(
            f"Delta Chat send -> IncomingMsg p50, {label} Dovecot, {count} msgs "
            f"{DC_GAP:.0f} s apart: {pct(lat, 50):.0f} ms{goal[0]}"
        )
        print(
            f"Delta Chat send -> IncomingMsg p90, {label} Dovecot, {count} msgs "
            f"{DC_GAP:.0f} s apart: {pct(lat, 90):.0f} ms{goal[1]}"
        )


def bench_port443() -> None:
    """Send -> receive through the web port by ALPN (IMAP and SMTP tunnelled to Dovecot
    and Postfix) next to the direct ports, one relay, alternating runs."""
    d = state_dir()
    direct: list[float] = []
    tunnelled: list[float] = []
    try:
        with Relay(d, {"max_user_send_per_minute": 6000}, nodelay=True) as relay:
            for _ in range(2):
                direct += dc_latencies(relay, DC_MESSAGES // 2, DC_GAP)
                tunnelled += dc_latencies(relay, DC_MESSAGES // 2, DC_GAP, port443=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    for p in (50, 90):
        print(
            f"Delta Chat send -> IncomingMsg p{p}, {len(direct)} msgs each: direct ports "
            f"{pct(direct, p):.1f} ms, through port 443 (ALPN) {pct(tunnelled, p):.1f} ms"
            + (" (target: within 5 ms of direct)" if p == 50 else "")
        )


def main() -> None:
    if os.geteuid() != 0:
        print("bench_relay: needs root (starts Postfix and Dovecot)")
        return
    bench_make_run()
    bench_idle()
    bench_hibernated()
    bench_dc()
    bench_port443()


if __name__ == "__main__":
    main()
