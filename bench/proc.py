"""What the benchmarks read of a process from /proc."""

from __future__ import annotations


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
