"""When a local relay is ready: every socket of every component answers."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from chatmaild.common.service import Endpoint
from chatmaild.relay.ports import _listening
from chatmaild.relay.processes import RelayError, _tail

log = logging.getLogger("chatmaild.relay")

START_TIMEOUT = 30.0


class Readiness:
    """Waiting until every socket of the relay answers (part of ``Relay``)."""

    def _readiness_checks(self) -> list[tuple[str, str | tuple[str, int], Path]]:
        """(what, unix path or (host, port), log to show on failure)."""
        c, cfg, logs = self.components, self.config, self.log_dir
        checks: list[tuple[str, str | tuple[str, int], Path]] = []
        for name, key in (
            ("doveauth", "doveauth_socket"),
            ("doveauth", "doveauth_http_socket"),  # Dovecot 2.4's Lua passdb/userdb
            ("lastlogin", "lastlogin_socket"),
            ("metadata", "metadata_socket"),
        ):
            if name in c:
                checks.append((name, getattr(cfg, key), logs / "dict.log"))
        if "filtermail" in c:
            checks.append(("filtermail", cfg.filtermail_smtp_socket, logs / "filtermail.log"))
            checks.append(("filtermail incoming", cfg.filtermail_smtp_socket_incoming,
                           logs / "filtermail.log"))  # fmt: skip
            checks.append(("filtermail milter", cfg.filtermail_milter_socket,
                           logs / "filtermail.log"))  # fmt: skip
            checks.append(("filtermail transport", cfg.filtermail_transport_socket,
                           logs / "filtermail.log"))  # fmt: skip
        if "newemail" in c:  # the web process, and its role on 993: the IMAP front
            checks.append(("newemail", (self.host, cfg.newemail_port), logs / "newemail.log"))
            checks.append(("imaps", (self.host, cfg.imaps_port), logs / "newemail.log"))
        if "filtermail" in c and cfg.metrics_address:  # a role of filtermail's process
            where = Endpoint.parse(cfg.metrics_address)
            checks.append(("metrics", (where.host, where.port), logs / "filtermail.log"))
        if "newemail" in c and cfg.iroh_relay_port:  # the web process's iroh relay role
            checks.append(("iroh", (self.host, cfg.iroh_relay_port), logs / "newemail.log"))
        if "turn" in c:  # coturn's TCP listener (its UDP one opens with it)
            checks.append(("coturn", (self.host, cfg.turn_port), logs / "turn.log"))
        if "postfix" in c:
            # the unix services (re-injection) are bound before `postfix start` returns
            for name in ("smtp", "submission", "submissions", "submissions_tunnel", "smtp_tunnel"):
                checks.append((f"postfix {name}", (self.host, int(self.ports[name])),
                               logs / "postfix.log"))  # fmt: skip
        if "dovecot" in c:
            imaps = "imap_front" if "newemail" in c else "imaps"  # the web process's 993
            for name in ("imap", imaps, "imaps_tunnel"):
                checks.append((f"dovecot {name}", (self.host, int(self.ports[name])),
                               logs / "dovecot.log"))  # fmt: skip
            if "postfix" in c:
                checks.append(("dovecot lmtp", str(self.ports["lmtp"]), logs / "dovecot.log"))
        return checks

    def _wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every listener is up."""
        pending = self._readiness_checks()
        deadline = time.monotonic() + timeout
        while pending:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RelayError(
                        f"{name} exited with {proc.returncode} during start\n" + self._log_of(name)
                    )
            tcp, unix = _listening()
            pending = [
                chk
                for chk in pending
                if not (chk[1] in unix if isinstance(chk[1], str) else chk[1] in tcp)
            ]
            if not pending:
                break
            if time.monotonic() > deadline:
                what, _, logfile = pending[0]
                raise RelayError(
                    f"not ready after {timeout:.0f}s: {', '.join(p[0] for p in pending)}\n"
                    + _tail(logfile)
                )
            time.sleep(0.02)
