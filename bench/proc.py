"""What the benchmarks read of a process from /proc."""

from __future__ import annotations


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` (VmRSS) in MB (MiB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
