"""What the benchmarks read of a process from /proc."""

from __future__ import annotations

import os


def _field_mb(path: str, key: str) -> float:
    """The ``key:`` line of a /proc file given in kB, in MB (MiB)."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in {path}")


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` (VmRSS) in MB (MiB)."""
    return _field_mb(f"/proc/{pid}/status", "VmRSS")


def pss_mb(pid: int) -> float:
    """Proportional set size: shared library pages split among the processes using them."""
    return _field_mb(f"/proc/{pid}/smaps_rollup", "Pss")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of ``pid`` itself and of its children it has waited for (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    # utime+stime come in whole ticks: a process that ran 2 ms reads 0
    with open(f"/proc/{pid}/schedstat") as f:
        own = int(f.read().split()[0]) / 1e9  # nanoseconds on the CPU
    reaped = (int(fields[13]) + int(fields[14])) / tick  # cutime, cstime
    return own, reaped
