"""System resource checks that stop registration on an overloaded relay.

Each reading is independent: one that cannot be read is skipped with a
warning and the others still apply (reference syslimits semantics).
"""

from __future__ import annotations

import logging
import os

from chatmaild.common.config import Config

log = logging.getLogger("chatmaild.dictd.syslimits")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None if unreadable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fp:
            for line in fp:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_disk_space(path: str) -> int | None:
    """Free bytes for unprivileged users on the filesystem holding ``path``
    (or its nearest existing parent, before the directory is first created)."""
    while True:
        try:
            st = os.statvfs(path)
            break
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
        except OSError:
            return None
    return st.f_bavail * st.f_frsize


def load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def resource_refusal(config: Config) -> str | None:
    """Why the machine is too busy to create accounts now, or None."""
    load = load_1m()
    if load is None:
        log.warning("cannot read load average; skipping that check")
    elif load > config.max_load_1m:
        return f"load average {load:.2f} above max_load_1m {config.max_load_1m}"
    mem = available_memory()
    if mem is None:
        log.warning("cannot read available memory; skipping that check")
    elif mem < config.min_available_memory:
        limit = config.min_available_memory >> 20
        return f"available memory {mem >> 20}M below min_available_memory {limit}M"
    disk = free_disk_space(config.mailboxes_dir)
    if disk is None:
        log.warning("cannot read free space of %s; skipping that check", config.mailboxes_dir)
    elif disk < config.min_free_disk_space:
        limit = config.min_free_disk_space >> 20
        return f"free disk space {disk >> 20}M below min_free_disk_space {limit}M"
    return None
