"""Ports of a local relay: free ones picked and held until the servers bind them,
and checks that nobody else listens on them (the peers' relays included)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from chatmaild.relay.processes import RelayError

log = logging.getLogger("chatmaild.relay")

# ini keys holding a TCP port, and the short names used in Relay.ports
PORT_KEYS = {
    "smtp": "smtp_port",
    "submission": "submission_port",
    "submissions": "submissions_port",
    "imap": "imap_port",
    "imaps": "imaps_port",
    "newemail": "newemail_port",
    "http": "http_port",
    "imaps_tunnel": "imaps_tunnel_port",
    "imap_front": "imap_front_port",
    "submissions_tunnel": "submissions_tunnel_port",
    "smtp_tunnel": "smtp_tunnel_port",
    "turn": "turn_port",
    "iroh": "iroh_relay_port",
}
# ini keys holding the filter path's UNIX sockets (a port would be open to every
# local user), also listed in Relay.ports; below Layout.local's queue directory
SOCKET_KEYS = {
    "reinject": "postfix_reinject_socket",
    "reinject_incoming": "postfix_reinject_socket_incoming",
    "filtermail": "filtermail_smtp_socket",
    "filtermail_incoming": "filtermail_smtp_socket_incoming",
    "filtermail_milter": "filtermail_milter_socket",
    "filtermail_transport": "filtermail_transport_socket",
}
LOCAL_SOCKETS = {
    "postfix_reinject_socket": "postfix/spool/public/reinject",
    "postfix_reinject_socket_incoming": "postfix/spool/public/reinject_incoming",
    "filtermail_smtp_socket": "postfix/spool/filtermail/outgoing.sock",
    "filtermail_smtp_socket_incoming": "postfix/spool/filtermail/incoming.sock",
    "filtermail_milter_socket": "postfix/spool/filtermail/milter.sock",
    "filtermail_transport_socket": "postfix/spool/filtermail/transport.sock",
}


def reserve_ports(count: int, host: str = "127.0.0.1") -> list[socket.socket]:
    """Sockets bound to ``count`` distinct free ports, held until the servers listen.

    Postfix listens with SO_REUSEPORT: two relays given the same port both start
    and the kernel deals connections out between them (seen in CI as "Relay
    access denied" for a relay's own domain).  Ports only picked, then released,
    can be picked again by the next relay before the first one listens.  So the
    port stays bound: bound without SO_REUSEADDR, the kernel picks a port nothing
    else holds and no later pick gets it; SO_REUSEADDR set afterwards lets our
    servers, which all set it, bind and listen there all the same.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def reserve_port(port: int, host: str = "127.0.0.1") -> socket.socket | None:
    """Hold ``port`` as :func:`reserve_ports` does, or None when something listens there.

    SO_REUSEADDR before bind: connections of a previous run in TIME_WAIT do not count.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        return None
    return s


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel says are free right now (distinct, but not held: see reserve_ports)."""
    socks = reserve_ports(count, host)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _previous_ports(ini: Path) -> dict[str, int]:
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(ini, encoding="utf-8")
        items = dict(parser.items("params"))
    except (configparser.Error, OSError):
        return {}
    return {k: int(v) for k, v in items.items() if k in PORT_KEYS.values() and v.isdigit()}


def _tcp_listeners() -> Iterator[tuple[str, int, str]]:
    """(IPv4 address, port, socket inode) of every listening TCP socket, from /proc/net/tcp."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = fields[1].split(":")
            yield socket.inet_ntoa(bytes.fromhex(addr)[::-1]), int(port, 16), fields[9]


def _listeners_per_port(host: str = "127.0.0.1") -> dict[int, int]:
    """How many listening IPv4 TCP sockets (distinct inodes) each port of ``host`` has."""
    inodes: dict[int, set[str]] = {}
    for ip, port, inode in _tcp_listeners():
        if ip in (host, "0.0.0.0"):
            inodes.setdefault(port, set()).add(inode)
    return {port: len(found) for port, found in inodes.items()}


def _listening() -> tuple[set[tuple[str, int]], set[str]]:
    """Listening IPv4 TCP (host, port) and UNIX socket paths, from /proc/net.

    Looking instead of connecting keeps readiness checks out of the servers'
    logs (a probe that never speaks TLS is logged as a failed handshake).
    """
    tcp: set[tuple[str, int]] = set()
    for ip, port, _ in _tcp_listeners():
        tcp.add((ip, port))
        if ip == "0.0.0.0":
            tcp.add(("127.0.0.1", port))
    unix: set[str] = set()
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
                unix.add(fields[7])
    return tcp, unix


def connectable(target: str | tuple[str, int]) -> bool:
    """Whether a UNIX socket path or (host, port) accepts a connection now."""
    if isinstance(target, str):
        if not os.path.exists(target):
            return False
        family, addr = socket.AF_UNIX, target
    else:
        family, addr = socket.AF_INET, target
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(addr)
        except OSError:
            return False
    return True


class PortHolding:
    """The relay's own ports: held from the pick until its servers bind them (part of
    ``Relay``)."""

    def _release_ports(self) -> None:
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()

    def _reserve_configured_ports(self) -> None:
        """Hold the ports again for a start after a stop (best effort: the shared-port
        check after the start still catches another listener)."""
        if self._reserved:
            return
        for name in PORT_KEYS:
            held = reserve_port(int(self.ports[name]), self.host)
            if held is not None:
                self._reserved.append(held)

    def _check_ports_unshared(self) -> None:
        """Refuse to run when another process listens on one of our ports too."""
        # coturn listens with a socket per thread itself (SO_REUSEPORT): not counted
        ports = {int(self.ports[name]): name for name in PORT_KEYS if name != "turn"}
        shared = {
            port: count for port, count in _listeners_per_port(self.host).items()
            if port in ports and count > 1
        }  # fmt: skip
        if shared:
            raise RelayError(
                "other processes listen on this relay's ports too (SO_REUSEPORT): "
                + ", ".join(f"{ports[p]} {p} ({n} listeners)" for p, n in sorted(shared.items()))
            )
