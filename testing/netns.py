"""A private network namespace for the calling thread, and nftables rules in it.

:func:`private_network` moves the calling thread (and every process and thread
it starts meanwhile) into a new network namespace with only ``lo`` up, and
back when it ends: a test gets the machine's loopback to itself, and a
firewall (:class:`Firewall`, Debian's nftables) that touches nothing else.
Python 3.11 has no ``os.setns``: libc's, through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@contextlib.contextmanager
def private_network() -> Iterator[None]:
    """The calling thread in a network namespace of its own (root only)."""
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield
        finally:
            _check(_libc.setns(home, CLONE_NEWNET), "setns back")
    finally:
        os.close(home)


class Firewall:
    """nftables rules of the current network namespace: TCP ports to refuse."""

    TABLE = "chatmaild_test"

    def __init__(self) -> None:
        self._nft(f"add table inet {self.TABLE}")
        self._nft(f"add chain inet {self.TABLE} out {{ type filter hook output priority 0 ; }}")
        self.blocked: dict[int, str] = {}

    @staticmethod
    def _nft(command: str) -> str:
        res = subprocess.run(["nft", "-a", *command.split()], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nft {command}: {res.stderr.strip()}")
        return res.stdout

    def block(self, port: int) -> None:
        """Connections to TCP ``port`` are refused (a reset), as by a provider's firewall."""
        if port in self.blocked:
            return
        self._nft(f"add rule inet {self.TABLE} out tcp dport {port} reject with tcp reset")
        listing = self._nft(f"list chain inet {self.TABLE} out")
        [handle] = [
            line.rsplit("handle", 1)[1].strip()
            for line in listing.splitlines()
            if f"dport {port} " in line
        ]
        self.blocked[port] = handle

    def open(self, port: int) -> None:
        handle = self.blocked.pop(port)
        self._nft(f"delete rule inet {self.TABLE} out handle {handle}")

    def close(self) -> None:
        self._nft(f"delete table inet {self.TABLE}")
