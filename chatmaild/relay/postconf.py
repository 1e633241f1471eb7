"""What ``chatmaild setup`` changes in Postfix's own main.cf and master.cf (pure logic).

Debian's /etc/postfix/main.cf and master.cf belong to the administrator (Postfix's
postinst makes them once; they are no conffiles), so the package never replaces
them: it renders its complete configuration below /etc/chatmail/postfix and
applies each main.cf parameter with ``postconf -e`` and each master.cf service
with ``postconf -M``.  A service of the administrator's that listens on one of
our ports (Debian's ``smtp inet`` on 25, say) is commented out with
``postconf -M#`` rather than deleted.  The functions here read ``postconf``'s
output and decide the commands; :mod:`chatmaild.relay.system` runs them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

# `postconf -c DIR -n` names DIR itself; Postfix's own main.cf must never move it
NEVER_SET = frozenset({"config_directory"})

# /etc/services may be missing on a minimal system; these are what Postfix's
# master.cf names mean there
WELL_KNOWN_PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "smtps": 465}


@dataclass(frozen=True)
class MasterEntry:
    """One master.cf service as ``postconf -M`` prints it (one line, -o options included)."""

    name: str
    type: str
    line: str

    @property
    def key(self) -> str:
        return f"{self.name}/{self.type}"


def parse_main(postconf_n: str) -> dict[str, str]:
    """``postconf -n`` output -> {parameter: value} (values may be empty)."""
    params = {}
    for line in postconf_n.splitlines():
        name, sep, value = line.partition(" = ")
        if not sep:
            name, sep, value = line.partition(" =")  # "key =" for an empty value
        if sep and name.strip():
            params[name.strip()] = value.strip()
    return params


def parse_master(postconf_m: str) -> list[MasterEntry]:
    """``postconf -M`` output (one service per line) -> entries."""
    entries = []
    for line in postconf_m.splitlines():
        fields = line.split()
        if len(fields) >= 8 and not line.startswith("#"):
            entries.append(MasterEntry(fields[0], fields[1], " ".join(fields)))
    return entries


def inet_port(service_name: str) -> int | None:
    """The TCP port of an ``inet`` service name: ``25``, ``smtp``, ``127.0.0.1:2525``."""
    port = service_name.rpartition(":")[2]
    if port.isdigit():
        return int(port)
    if port in WELL_KNOWN_PORTS:
        return WELL_KNOWN_PORTS[port]
    try:
        return socket.getservbyname(port, "tcp")
    except OSError:
        return None


def conflicting_services(current: list[MasterEntry], ours: list[MasterEntry]) -> list[str]:
    """name/type of the administrator's inet services that listen on a port of ours."""
    our_keys = {e.key for e in ours}
    our_ports = {inet_port(e.name) for e in ours if e.type == "inet"} - {None}
    return [
        e.key
        for e in current
        if e.type == "inet" and e.key not in our_keys and inet_port(e.name) in our_ports
    ]


def main_changes(current: dict[str, str], ours: dict[str, str]) -> list[str]:
    """``name=value`` arguments for ``postconf -e``: our parameters that differ."""
    return [f"{k}={v}" for k, v in ours.items() if k not in NEVER_SET and current.get(k) != v]


def master_changes(current: list[MasterEntry], ours: list[MasterEntry]) -> list[str]:
    """``name/type=entry`` arguments for ``postconf -M``: our services that differ."""
    have = {e.key: e.line for e in current}
    return [f"{e.key}={e.line}" for e in ours if have.get(e.key) != e.line]
