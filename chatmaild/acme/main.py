"""get and renew the relay's certificate from an ACME CA

Run by chatmail-acme.timer (hourly).  When the served certificate is
self-signed, not from acme_directory, does not cover mail_domain and
mta-sts.<mail_domain>, or has less than a third of its lifetime left, it asks
the CA (through dehydrated, HTTP-01 answered by the web process on port 80),
installs the new pair in one step and reloads Postfix, Dovecot and the web
process, which keep their open connections.  Otherwise it does not contact the
CA at all, so `chatmaild setup` and reinstalls cost the CA nothing.

When the CA cannot be reached or refuses, the served certificate stays (the
self-signed one before the first issuance), one line says why, and the next
attempt waits 1, 2, 4 ... up to 24 hours.

Nothing is done for an IP-only relay, a _-prefixed test domain,
tls_external_cert_and_key, or an empty acme_directory.

FILES
    /etc/chatmail/chatmail.ini    mail_domain, acme_directory, acme_email
    /etc/chatmail/tls/            cert.pem and key.pem, links into current/
    /var/lib/chatmaild/acme/       account, certificates, back-off state

EXIT STATUS
    0 nothing to do, waiting, or a new certificate served; 1 the CA gave none;
    2 a configuration error.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import pwd
import shlex
import subprocess
import time
from pathlib import Path

from chatmaild.acme import dehydrated, tlsdir
from chatmaild.acme.certificate import CertInfo, parse_pem, renewal_reason
from chatmaild.common.config import ACME_CHALLENGE_DIR, ACME_STATE_DIR, Config
from chatmaild.common.service import load_config_or_exit, make_parser, setup_logging

PROG = "chatmail-acme"
TLS_DIR = Path("/etc/chatmail/tls")
STATE_FILE = "state.json"
BACKOFF_FIRST = datetime.timedelta(hours=1)
BACKOFF_MAX = datetime.timedelta(hours=24)
# the units reread the certificate and keep their connections (postfix reload,
# doveadm reload, SIGHUP of the web process)
RELOAD = [
    "systemctl try-reload-or-restart postfix.service dovecot.service chatmail-newemail.service"
]
# Dovecot 2.4.1 (Debian 13): its master crashes (SIGSEGV) when reloaded while LMTP
# deliveries run, so there it restarts (its clients connect again)
RELOAD_DOVECOT_24 = [
    "systemctl try-reload-or-restart postfix.service chatmail-newemail.service",
    "systemctl try-restart dovecot.service",
]


def default_reload() -> list[str]:
    from chatmaild.relay.dovecotversion import UnsupportedDovecot, installed_series

    try:
        return RELOAD_DOVECOT_24 if installed_series() == "2.4" else RELOAD
    except (UnsupportedDovecot, OSError):
        return RELOAD


# then, once the reloaded servers settled, Postfix retries what it deferred meanwhile: a
# Dovecot lmtp process that was ending answers a new delivery "421 4.3.2 Shutting
# down", and Postfix would otherwise wait for its next retry (minimal_backoff_time)
FLUSH = ["postqueue -f"]
FLUSH_AFTER = 3.0  # seconds


def skip_reason(config: Config, tls_dir: Path | None = None) -> str | None:
    """Why this relay gets no certificate from a CA, or None.

    ``tls_dir``: a directory the caller named explicitly (make run's relay, whose
    tls_external_cert_and_key points into it): its pair is ours to replace."""
    external = config.tls_external_cert_and_key
    if external and (tls_dir is None or Path(external[0]).parent.resolve() != tls_dir.resolve()):
        return "tls_external_cert_and_key names the certificate"
    if not config.acme_directory:
        return "acme_directory is empty"
    if config.is_ip_domain:
        return "an IP-only relay (no name to certify)"
    if config.mail_domain.startswith("_"):
        return "a _-prefixed test domain"
    return None


def backoff(failures: int) -> datetime.timedelta:
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))


class Acme:
    def __init__(
        self,
        config: Config,
        state_dir: Path,
        tls_dir: Path,
        reload: list[str],
        log: logging.Logger,
        ca_bundle: str | None = None,
        challenges: Path | None = None,
        flush: list[str] | None = None,
    ) -> None:
        self.config = config
        self.tls_dir = tls_dir
        self.reload_commands = reload
        self.flush_commands = FLUSH if flush is None else flush
        self.log = log
        self.ca_bundle = ca_bundle
        self.state_file = state_dir / STATE_FILE
        # one dehydrated directory per CA: its account and certificates are that CA's
        ca = hashlib.sha256(config.acme_directory.encode()).hexdigest()[:16]
        self.paths = dehydrated.Paths(
            state=state_dir / f"ca-{ca}", challenges=challenges or state_dir / "challenges"
        )
        self.names = config.certificate_names

    # -- state

    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.state_file)

    def served(self) -> CertInfo | None:
        try:
            return parse_pem((self.tls_dir / "cert.pem").read_bytes())
        except (OSError, ValueError):
            return None

    def _issued(self) -> tuple[CertInfo, bytes, bytes] | None:
        chain, key = self.paths.issued(self.names[0])
        try:
            pem, key_pem = chain.read_bytes(), key.read_bytes()
            return parse_pem(pem), pem, key_pem
        except (OSError, ValueError):
            return None

    # -- the run

    def why_renew(self, now: datetime.datetime, served: CertInfo | None, state: dict) -> str | None:
        reason = renewal_reason(served, self.names, now)
        origin = state.get("served", {}).get(served.fingerprint) if served else None
        if reason is None and origin != self.config.acme_directory:
            reason = f"the certificate is not from {self.config.acme_directory}"
        return reason

    def run(self, now: datetime.datetime, force: bool = False, ignore_backoff: bool = False) -> int:
        names = " ".join(self.names)
        served, state = self.served(), self._state()
        reason = "renewal forced" if force else self.why_renew(now, served, state)
        if reason is None:
            assert served is not None
            self.log.info(
                "certificate for %s valid until %s, renewal after %s",
                names, _when(served.not_after), _when(served.renew_at()),
            )  # fmt: skip
            return 0
        # obtained before but not served (an interrupted run): no need to ask again
        issued = self._issued()
        if (
            not force
            and issued is not None
            and renewal_reason(issued[0], self.names, now) is None
            and issued[0].fingerprint != (served.fingerprint if served else None)
        ):
            return self._serve(issued, state, now, "obtained earlier")
        if not ignore_backoff and not force and state.get("next_attempt"):
            next_attempt = datetime.datetime.fromisoformat(state["next_attempt"])
            if now < next_attempt:
                self.log.info(
                    "ACME: waiting until %s before asking %s again (last failure: %s)",
                    _when(next_attempt), self.config.acme_directory, state.get("reason", "?"),
                )  # fmt: skip
                return 0
        self.log.info("ACME: asking %s for %s: %s", self.config.acme_directory, names, reason)
        outcome = dehydrated.obtain(
            self.config.acme_directory, self.paths, self.names, self.config.acme_email,
            ca_bundle=self.ca_bundle, force=True,
        )  # fmt: skip
        issued = self._issued() if outcome.ok else None
        if issued is None:
            failures = int(state.get("failures", 0)) + 1
            state |= {
                "failures": failures,
                "reason": outcome.reason or "dehydrated made no certificate",
                "next_attempt": (now + backoff(failures)).isoformat(),
            }
            self._save(state)
            keeping = (
                "the self-signed certificate"
                if served is None or served.self_signed
                else f"the certificate valid until {_when(served.not_after)}"
            )
            self.log.error(
                "ACME: no certificate for %s from %s: %s; serving %s; next attempt after %s",
                names, self.config.acme_directory, state["reason"], keeping,
                _when(now + backoff(failures)),
            )  # fmt: skip
            self.log.debug("dehydrated said:\n%s", outcome.output)
            return 1
        return self._serve(issued, state, now, "new")

    def _serve(
        self, issued: tuple[CertInfo, bytes, bytes], state: dict, now: datetime.datetime, what: str
    ) -> int:
        info, pem, key = issued
        gid = _vmail_gid(self.config)
        tlsdir.install(self.tls_dir, pem, key, gid)
        # which CA each served certificate came from (the last few)
        served = dict(list(state.get("served", {}).items())[-4:])
        served[info.fingerprint] = self.config.acme_directory
        self._save({"served": served})
        self.log.info(
            "ACME: serving the %s certificate for %s from %s (issuer %s), valid until %s,"
            " renewal after %s",
            what, " ".join(self.names), self.config.acme_directory, info.issuer,
            _when(info.not_after), _when(info.renew_at()),
        )  # fmt: skip
        return self._reload()

    def _reload(self) -> int:
        for command in self.reload_commands:
            # the certificate is in place; a server that was not reloaded reads it at
            # its next start
            self._run(command, "reloading after the new certificate")
        if self.flush_commands:
            time.sleep(FLUSH_AFTER)
            for command in self.flush_commands:
                self._run(command, "retrying deferred mail")
        return 0

    def _run(self, command: str, what: str) -> None:
        res = subprocess.run(shlex.split(command), capture_output=True, text=True)
        if res.returncode != 0:
            self.log.warning("%s: %s failed: %s", what, command,
                             (res.stderr or res.stdout).strip())  # fmt: skip


def _when(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _vmail_gid(config: Config) -> int | None:
    """The group that may read the key (the web process runs as vmail_user)."""
    try:
        return pwd.getpwnam(config.vmail_user).pw_gid
    except KeyError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(PROG, __doc__)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=ACME_STATE_DIR,
        metavar="DIR",
        help="account, certificates and back-off state (default: %(default)s)",
    )
    parser.add_argument(
        "--challenges",
        type=Path,
        default=ACME_CHALLENGE_DIR,
        metavar="DIR",
        help="HTTP-01 answers the web process serves (default: %(default)s)",
    )
    parser.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help=f"the served cert.pem and key.pem (default: {TLS_DIR})",
    )
    parser.add_argument(
        "--reload",
        action="append",
        metavar="COMMAND",
        help="run after a new certificate (repeatable; default: reload "
        "Postfix, Dovecot and chatmail-newemail through systemd)",
    )
    parser.add_argument(
        "--flush",
        action="append",
        metavar="COMMAND",
        help="run a few seconds after the reloads: Postfix retries what they deferred"
        " (repeatable; default: postqueue -f)",
    )
    parser.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="CA certificates that verify the ACME directory's HTTPS "
        "(a test CA; default: the system's)",
    )
    parser.add_argument(
        "--force", action="store_true", help="ask the CA now, even if the certificate is not due"
    )
    parser.add_argument(
        "--ignore-backoff",
        action="store_true",
        help="ask the CA now even if the last attempt failed recently",
    )
    args = parser.parse_args(argv)  # fmt: skip
    log = setup_logging(PROG, verbose=args.verbose)
    config = load_config_or_exit(args.config, PROG)
    why_not = skip_reason(config, args.tls_dir)
    if why_not is not None:
        log.info("no certificate from a CA for %s: %s", config.mail_domain, why_not)
        return 0
    acme = Acme(
        config, args.state_dir, args.tls_dir or TLS_DIR,
        default_reload() if args.reload is None else args.reload, log,
        ca_bundle=args.ca_bundle, challenges=args.challenges, flush=args.flush,
    )  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    return acme.run(now, force=args.force, ignore_backoff=args.ignore_backoff)


if __name__ == "__main__":
    raise SystemExit(main())
