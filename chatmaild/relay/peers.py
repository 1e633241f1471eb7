"""Local relays that exchange mail: ``make run ... PEERS=<other state dir>``.

Two relays on one machine have no DNS: no MX to find each other, no TXT
record to verify each other's DKIM signatures.  Each ``make run`` relay
therefore answers its own filtermail's DKIM lookups from a loopback DNS server
(:class:`~.dns.LoopbackDNS`), and learns its peers from their ``relay.json``
(mail domain, port 25, DKIM record):

* a relay started with ``--peer DIR`` routes DIR's domain to DIR's port 25
  and leaves its own state directory in ``DIR/peers.d/``, so the other relay,
  running or started later, peers back;
* :meth:`PeerLinks.refresh`, called every second, picks up new and restarted
  peers (a restart may change ports).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from chatmaild.relay.dns import LoopbackDNS
from chatmaild.relay.stack import Relay

log = logging.getLogger("chatmaild.relay")

PEERS_DIR = "peers.d"


class PeerError(Exception):
    """A peer cannot be linked (same domain, unreadable facts)."""


class PeerLinks:
    def __init__(self, relay: Relay, dns: LoopbackDNS, peer_dirs: list[Path]) -> None:
        self.relay = relay
        self.dns = dns
        self.peer_dirs = {p.resolve() for p in peer_dirs} - {relay.state_dir}
        self._linked: dict[Path, tuple[str, int, tuple[str, str] | None]] = {}

    def publish_own_key(self) -> None:
        if self.relay.dkim_available():
            self.dns.set_txt(*self.relay.dkim_record())

    def register(self) -> None:
        """Tell every peer named on the command line to link back to us."""
        me = self.relay.state_dir
        for peer in self.peer_dirs:
            inbox = peer / PEERS_DIR
            inbox.mkdir(parents=True, exist_ok=True)
            entry = inbox / f"{self.relay.mail_domain}.json"
            tmp = inbox / f".{entry.name}.tmp"
            tmp.write_text(json.dumps({"state_dir": str(me)}) + "\n", encoding="utf-8")
            os.replace(tmp, entry)

    def _registered(self) -> set[Path]:
        inbox = self.relay.state_dir / PEERS_DIR
        found = set()
        for entry in inbox.glob("*.json") if inbox.is_dir() else ():
            try:
                found.add(Path(json.loads(entry.read_text(encoding="utf-8"))["state_dir"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("relay: ignoring peer registration %s: %s", entry, e)
        return found

    def refresh(self) -> list[str]:
        """Link peers that appeared or changed since the last call; return their domains."""
        self.peer_dirs |= self._registered() - {self.relay.state_dir}
        linked = []
        for peer in sorted(self.peer_dirs):
            try:
                facts = json.loads((peer / "relay.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not running (yet): its routes stay, mail for it waits in the queue
            domain, port = facts["mail_domain"], int(facts["ports"]["smtp"])
            dkim = tuple(facts["dkim"]) if facts.get("dkim") else None
            if self._linked.get(peer) == (domain, port, dkim):
                continue
            if domain == self.relay.mail_domain:
                raise PeerError(f"peer {peer} has this relay's own mail_domain {domain}")
            https_port = int(facts["ports"].get("newemail", 443))
            self.relay.add_peer(domain, port, facts.get("host", "127.0.0.1"), https_port)
            if dkim is not None:
                self.dns.set_txt(*dkim)
            self._linked[peer] = (domain, port, dkim)  # type: ignore[assignment]
            log.warning(
                "relay %s: peered with %s (port 25 is %d)", self.relay.mail_domain, domain, port
            )
            linked.append(domain)
        return linked
