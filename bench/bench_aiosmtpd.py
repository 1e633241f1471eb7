"""filtermail's own SMTP server against an aiosmtpd front end on the same handler.

Both run ``filtermail outgoing``'s handler, re-injection pool, DKIM key and
uvloop (the aiosmtpd one is ``bench/alternatives/aiosmtpd_filtermail.py``), alone against an
SMTP sink standing in for Postfix, driven the way Postfix's smtpd_proxy_filter
drives them (a new connection per message, 4 at once, UNIX sockets).  Figures
per front end: throughput of 4 KB and 128 KB messages, p99 latency of one
message (connect to the 250 after DATA), the server's CPU time per message, and
its peak RSS while 10 x 25 MB messages arrive at once.  The design rule (issue
12): build on aiosmtpd only if it is within 10 % of ours on every figure.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_filtermail import (
    CONNECTIONS,
    _cpu_seconds,
    _proxy_session,
    _vm_kb,
    filter_alone_config,
    run_against_sink,
)
from testing import mails

FRONT_ENDS = {
    "ours": ["-m", "chatmaild.filtermail.main", "--config", "{ini}", "outgoing"],
    "aiosmtpd": ["-m", "bench.alternatives.aiosmtpd_filtermail", "--config", "{ini}"],
}
SENDER = "sender001@chat.example"
RCPT = "rcpt00001@chat.example"


async def _session(path: str, payload: bytes) -> float:
    """One message as Postfix's proxy client sends it; seconds until the 250."""
    return await _proxy_session(path, SENDER, RCPT, payload)


async def _drive(path: str, count: int, payload: bytes, parallel: int) -> list[float]:
    left = [count]
    latencies: list[float] = []

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            latencies.append(await _session(path, payload))

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return latencies


def _measure(work: Path, name: str) -> dict[str, float]:
    filter_path, sink_path = str(work / "filter.sock"), str(work / "reinject.sock")
    ini = filter_alone_config(work, filter_path, sink_path)
    args = [a.format(ini=ini) for a in FRONT_ENDS[name]]
    figures: dict[str, float] = {}

    async def measure(proc: subprocess.Popen) -> None:
        for size, count in ((4096, 3000), (128 * 1024, 600)):
            payload = mails.encrypted_message(SENDER, [RCPT], size=size)
            await _drive(filter_path, 100, payload, CONNECTIONS)  # warm up
            before, start = _cpu_seconds(proc.pid), time.monotonic()
            latencies = await _drive(filter_path, count, payload, CONNECTIONS)
            label = f"{size // 1024}k"
            figures[f"throughput_{label}"] = count / (time.monotonic() - start)
            figures[f"cpu_{label}"] = (_cpu_seconds(proc.pid) - before) / count * 1e6
            figures[f"p99_{label}"] = statistics.quantiles(latencies, n=100)[98] * 1e3
        big = mails.encrypted_message(SENDER, [RCPT], size=25 * 2**20)
        await _drive(filter_path, 10, big, 10)
        figures["peak_rss_10x25MB"] = _vm_kb(proc.pid, "VmHWM") / 1024

    run_against_sink([sys.executable, *args], work / f"{name}.log", sink_path, filter_path,
                     measure, cwd=Path(__file__).parents[1])  # fmt: skip
    return figures


# figure -> (unit, True when more is better)
UNITS = {
    "throughput_4k": ("msg/s", True),
    "throughput_128k": ("msg/s", True),
    "p99_4k": ("ms", False),
    "p99_128k": ("ms", False),
    "cpu_4k": ("us/msg", False),
    "cpu_128k": ("us/msg", False),
    "peak_rss_10x25MB": ("MB", False),
}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-aiosmtpd-", dir="/tmp"))
    try:
        results = {}
        for name in FRONT_ENDS:
            (root / name).mkdir()
            results[name] = _measure(root / name, name)
        within = True
        for figure, (unit, more_is_better) in UNITS.items():
            ours, theirs = results["ours"][figure], results["aiosmtpd"][figure]
            # aiosmtpd relative to ours, as "how much worse" (> 1.10 fails the rule)
            worse = ours / theirs if more_is_better else theirs / ours
            within = within and worse <= 1.10
            print(f"filtermail_{figure}_ours: {ours:.1f} {unit}")
            print(f"filtermail_{figure}_aiosmtpd: {theirs:.1f} {unit} ({worse:.2f} x ours' cost)")
        verdict = "within 10 % on every figure" if within else "not within 10 %"
        print(f"aiosmtpd_front_end: {verdict}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
