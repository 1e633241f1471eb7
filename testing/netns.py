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
import socket
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


@contextlib.contextmanager
def far_network(name: str, here: str, there: tuple[str, ...]) -> Iterator[str]:
    """A second namespace ``name`` joined to the current one by a veth pair: this
    side gets ``here``/24, the far side every address of ``there`` (the first /24,
    the others /32).  Yields the name (``/run/netns/<name>``, for :func:`far_socket`)."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        first, *others = there
        commands = [
            "ip link add vhere type veth peer name vthere",
            f"ip link set vthere netns {name}",
            f"ip addr add {here}/24 dev vhere",
            "ip link set vhere up",
            f"ip -n {name} addr add {first}/24 dev vthere",
            *(f"ip -n {name} addr add {a}/32 dev vthere" for a in others),
            f"ip -n {name} link set vthere up",
            f"ip -n {name} link set lo up",
        ]
        for command in commands:
            subprocess.run(command.split(), check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name])


def far_socket(netns: str, address: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket bound to ``address`` in namespace ``netns`` (made by a thread that
    enters it; a socket keeps the namespace it was made in)."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                _check(_libc.setns(fd, CLONE_NEWNET), "setns")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, kind)
            sock.bind((address, 0))
            made.append(sock)
        except BaseException as e:  # reported in the caller's thread
            failed.append(e)

    thread = threading.Thread(target=make)  # the thread, in the other namespace, then ends
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]
