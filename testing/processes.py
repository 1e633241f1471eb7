"""Ending the servers a test started in sessions of their own (pebble, dnsmasq, ...)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL if it is not gone in ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def wait_listening(
    address: tuple[str, int], proc: subprocess.Popen | None = None, timeout: float = 30.0
) -> None:
    """Return once something accepts TCP connections at ``address``; RuntimeError
    when ``proc`` (the server that should) exits first or ``timeout`` passes."""
    import socket
    import time

    until = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server of {address} exited {proc.returncode}") from None
            if time.monotonic() > until:
                raise RuntimeError(f"nothing listens on {address} after {timeout} s") from None
            time.sleep(0.05)
