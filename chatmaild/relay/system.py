"""``chatmaild setup``: make this machine's Postfix and Dovecot a chatmail relay.

The Debian package's postinst runs it (after writing chatmail.ini from debconf);
an operator runs it again after editing chatmail.ini (``dpkg-reconfigure
chatmaild`` does the same).  Idempotent: keys, certificates and mail are kept.

What belongs to other packages is changed only the way they provide for:

- Postfix: the rendered configuration lives in /etc/chatmail/postfix; its
  parameters and services go into Debian's /etc/postfix/main.cf and master.cf
  with ``postconf -e`` / ``postconf -M`` (:mod:`chatmaild.relay.postconf`).  The
  two files as they were before the first setup are kept in
  /var/lib/chatmaild/postfix-before and put back on purge.
- Dovecot: the complete configuration lives in /etc/chatmail/dovecot; the
  package's drop-in for dovecot.service starts Dovecot with it (Debian's
  /etc/dovecot, whose stock auth would let system users log in through PAM, is
  left alone and unused).
- systemd: where chatmail.ini moves the mail store or a socket, drop-ins in
  /etc/systemd/system/UNIT.d/chatmail-ini.conf let the sandboxed units write there.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from chatmaild.common.config import Config, ConfigError
from chatmaild.common.turn import ensure_secret
from chatmaild.relay import dnsrecords
from chatmaild.relay.postconf import (
    conflicting_services,
    main_changes,
    master_changes,
    parse_main,
    parse_master,
)
from chatmaild.relay.render import (
    GENERATED_DIR,
    PACKAGE_STATE,
    Layout,
    raise_kernel_limits,
    render_all,
)

PROG = "chatmaild"
POSTFIX_DIR = Path("/etc/postfix")
POSTFIX_BEFORE = PACKAGE_STATE / "postfix-before"
CREATED_LIST = PACKAGE_STATE / "created-files"  # keys and certificates setup made (purge)
UNIT_DIR = Path("/etc/systemd/system")
DROPIN_NAME = "chatmail-ini.conf"
TLS_DIR = GENERATED_DIR / "tls"

# the units, in start order: the dict daemons before Dovecot, the filters before Postfix;
# one process per unit serves several roles (chatmail-dict: doveauth, last-login,
# metadata; filtermail: outgoing, incoming, milter); the web front door on its own
DAEMON_UNITS = (
    "chatmail-dict.service",
    "filtermail.service",
    "chatmail-newemail.service",
)
# the daemons' sockets, held open by systemd across their restarts (socket units):
# per unit, the service it starts and the chatmail.ini keys of its ListenStream=
# lines, in their order
SOCKET_UNITS = {
    "chatmail-dict.socket": (
        "chatmail-dict.service",
        ("doveauth_socket", "doveauth_http_socket", "lastlogin_socket", "metadata_socket"),
    ),
    "filtermail.socket": (
        "filtermail.service",
        (
            "filtermail_smtp_socket",
            "filtermail_smtp_socket_incoming",
            "filtermail_milter_socket",
            "filtermail_transport_socket",
        ),
    ),
}
# restarted after Dovecot: it serves port 993 (the IMAP front), which an earlier
# version's Dovecot held until its restart with the new configuration
WEB_UNITS = ("chatmail-newemail.service",)

# units of earlier versions (one process per role), stopped and their drop-ins removed
RETIRED_UNITS = (
    "doveauth.service",
    "chatmail-lastlogin.service",
    "chatmail-metadata.service",
    "filtermail-incoming.service",
    "filtermail-milter.service",
)
TIMER_UNITS = ("chatmail-expire.timer", "chatmail-fsreport.timer", "chatmail-acme.timer")
DOVECOT_UNIT = "dovecot.service"
POSTFIX_UNIT = "postfix.service"
# Debian's coturn with our drop-in (systemd/coturn.service.d): TURN for calls
TURN_UNITS = ("coturn.service",)

# what the units allow by default (systemd/*.service): paths below these need no drop-in
DEFAULT_WRITABLE = {
    "chatmail-dict.service": ("/home/vmail", "/var/lib/chatmaild/metrics"),
    "chatmail-expire.service": ("/home/vmail", "/var/lib/chatmaild/metrics"),
    "filtermail.service": ("/var/spool/postfix/filtermail", "/var/lib/chatmaild/metrics"),
}


class SetupError(Exception):
    """A step of the setup failed; the message says which and why."""


def say(text: str) -> None:
    print(f"{PROG} setup: {text}", flush=True)


class _Say:
    """A logger's warning() for helpers shared with make run: said like the rest."""

    @staticmethod
    def warning(fmt: str, *args: object) -> None:
        say(fmt % args)


_SAY_LOG = _Say()


# ---------------------------------------------------------------- pure parts


def _below(path: str, parents: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


def unit_needs(config: Config) -> dict[str, list[str]]:
    """Per unit, the directories chatmail.ini puts its files in (mail store, sockets)."""
    store = [config.mailboxes_dir, config.notification_dir]
    sockets = {
        # its sockets come from chatmail-dict.socket: nothing of the service's own in /run
        "chatmail-dict.service": [],
        "chatmail-expire.service": [],
        "filtermail.service": socket_paths(config, "filtermail.socket"),
    }
    needs = {}
    for unit, paths in sockets.items():
        dirs = [str(Path(p).parent) for p in paths]
        if not unit.startswith("filtermail"):
            dirs = store + dirs
        if config.metrics_address:  # each counts into its file there
            dirs.append(config.metrics_dir)
        needs[unit] = list(dict.fromkeys(dirs))
    return needs


def socket_paths(config: Config, unit: str) -> list[str]:
    """The sockets a socket unit (SOCKET_UNITS) holds open for its service."""
    return [getattr(config, key) for key in SOCKET_UNITS[unit][1]]


def socket_dropin(config: Config, unit: str) -> str | None:
    """A socket unit's drop-in when chatmail.ini moves one of its sockets, else None."""
    keys = SOCKET_UNITS[unit][1]
    paths = socket_paths(config, unit)
    if paths == [Config.__dataclass_fields__[key].default for key in keys]:
        return None
    lines = [
        "# written by `chatmaild setup` from chatmail.ini, which moves sockets of this",
        "# unit; rewritten (or removed) by every setup",
        "[Socket]",
        "ListenStream=",  # the unit's own paths are replaced, not added to
        *(f"ListenStream={path}" for path in paths),
    ]
    return "\n".join(lines) + "\n"


def unit_dropins(config: Config) -> dict[str, str]:
    """Drop-in text per unit whose files chatmail.ini moved out of the unit's defaults.

    A directory below /run becomes a RuntimeDirectory (systemd makes it, owned by
    the unit's user, mode 0700 like the defaults); any other is a ReadWritePaths.
    """
    dropins = {}
    for unit, dirs in unit_needs(config).items():
        moved = [d for d in dirs if not _below(d, DEFAULT_WRITABLE[unit])]
        if not moved:
            continue
        lines = [
            "# written by `chatmaild setup` from chatmail.ini, which puts files of this",
            "# unit outside its defaults; rewritten (or removed) by every setup",
            "[Service]",
        ]
        for d in moved:
            if d.startswith("/run/") and d.count("/") == 2:
                lines.append(f"RuntimeDirectory={d.removeprefix('/run/')}")
            else:
                lines.append(f"ReadWritePaths={d}")
        dropins[unit] = "\n".join(lines) + "\n"
    for unit in SOCKET_UNITS:
        text = socket_dropin(config, unit)
        if text is not None:
            dropins[unit] = text
    return dropins


def dns_records(config: Config, dkim_txt: str | None) -> str:
    """The zone-file lines an operator publishes for this relay (chatmaild dns)."""
    return dnsrecords.zone_text(config, dkim_txt)


# ---------------------------------------------------------------- steps


def run(cmd: list[str], what: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise SetupError(f"{what} failed: {' '.join(cmd)}: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def record_created(path: Path) -> None:
    PACKAGE_STATE.mkdir(parents=True, exist_ok=True)
    known = CREATED_LIST.read_text().splitlines() if CREATED_LIST.exists() else []
    if str(path) not in known:
        with open(CREATED_LIST, "a", encoding="utf-8") as f:
            f.write(f"{path}\n")


def ensure_directories(config: Config) -> None:
    """The mail store vmail's alone; filtermail's socket directories reachable by Postfix only."""
    vmail = pwd.getpwnam(config.vmail_user)
    store = Path(config.mailboxes_dir)
    # the package's vmail has no home (/nonexistent); one a former install gave it
    # (/home/vmail, above the default store) stays vmail's alone
    home = Path(vmail.pw_dir)
    for d in (home, store) if home.is_dir() and home != Path("/") else (store,):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, vmail.pw_uid, vmail.pw_gid)
        os.chmod(d, 0o700)
    # the daemons' counters (chatmail-metrics reads them): vmail's alone
    metrics_dir = Path(config.metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.chown(metrics_dir, vmail.pw_uid, vmail.pw_gid)
    os.chmod(metrics_dir, 0o700)
    postfix_gid = grp.getgrnam("postfix").gr_gid
    for path in (
        config.filtermail_smtp_socket,
        config.filtermail_smtp_socket_incoming,
        config.filtermail_milter_socket,
        config.filtermail_transport_socket,
    ):
        d = Path(path).parent
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, vmail.pw_uid, postfix_gid)
        os.chmod(d, 0o2750)  # setgid: every socket gets group postfix


def ensure_tls(config: Config) -> None:
    """A self-signed certificate unless chatmail.ini names one (kept across runs)."""
    if config.tls_external_cert_and_key:
        for path in config.tls_external_cert_and_key:
            if not Path(path).exists():
                say(f"warning: {path} (tls_external_cert_and_key) does not exist yet")
        return
    cert, key = TLS_DIR / "cert.pem", TLS_DIR / "key.pem"
    if not (cert.exists() and key.exists()):
        TLS_DIR.mkdir(parents=True, exist_ok=True)
        name = config.mail_domain.strip("[]")
        alt = f"IP:{name}" if config.is_ip_domain else f"DNS:{name}"
        run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "3650", "-subj", f"/CN={name}", "-addext",
             f"subjectAltName={alt}", "-keyout", str(key), "-out", str(cert)],
            "creating a self-signed certificate",
        )  # fmt: skip
        for path in (cert, key):
            record_created(path)
        say(f"created a self-signed certificate for {name} in {TLS_DIR}")
    # chatmail-newemail serves HTTPS as vmail
    os.chown(key, 0, pwd.getpwnam(config.vmail_user).pw_gid)
    os.chmod(key, 0o640)


def ensure_dkim(config: Config) -> str:
    """The DKIM key (made once, group vmail, 0640); returns its TXT record's value."""
    from chatmaild.common.accounts import atomic_write
    from chatmaild.filtermail.dkim import DKIMError, Signer, generate_key, public_value, txt_record

    path = Path(config.dkim_key_path)
    domain = config.mail_domain.strip("[]")
    if path.exists():
        pem = path.read_bytes()
    else:
        pem, _ = generate_key(2048)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, pem, mode=0o640)
        record_created(path)
        say(f"created the DKIM key {path}")
    os.chown(path, 0, pwd.getpwnam(config.vmail_user).pw_gid)
    os.chmod(path, 0o640)
    try:
        Signer(domain, config.dkim_selector, pem)
        value = public_value(pem)
    except (DKIMError, ValueError, TypeError) as e:
        raise SetupError(f"{path}: not a usable DKIM key: {e}") from None
    return txt_record(value)


def ensure_nodelay() -> Path | None:
    """The no-delay shim for the installed Dovecot (needs a C compiler; optional)."""
    from chatmaild.relay.nodelay import NodelayUnavailable, build

    try:
        return build(PACKAGE_STATE)
    except NodelayUnavailable as e:
        say(f"no-delay shim not used ({e}): Dovecot announces new mail 0.5 s later")
        return None


def save_postfix_before() -> None:
    """Postfix's main.cf and master.cf as they were before our first setup (for purge)."""
    if POSTFIX_BEFORE.exists():
        return
    tmp = POSTFIX_BEFORE.with_name(POSTFIX_BEFORE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("main.cf", "master.cf"):
        if (POSTFIX_DIR / name).exists():
            shutil.copy2(POSTFIX_DIR / name, tmp / name)
    os.replace(tmp, POSTFIX_BEFORE)


def apply_postfix(layout: Layout) -> None:
    """Our main.cf parameters and master.cf services into Postfix's own files."""
    save_postfix_before()
    main_cf, master_cf = POSTFIX_DIR / "main.cf", POSTFIX_DIR / "master.cf"
    if not main_cf.exists():  # Postfix installed as "No configuration"
        main_cf.touch(mode=0o644)
    if not master_cf.exists():
        shutil.copyfile("/usr/share/postfix/master.cf.dist", master_cf)
    ours = str(layout.postfix_config_dir)
    changes = main_changes(
        parse_main(run(["postconf", "-n"], "reading main.cf")),
        parse_main(run(["postconf", "-c", ours, "-n"], "reading our main.cf")),
    )
    if changes:
        run(["postconf", "-e", *changes], "postconf -e")
    current = parse_master(run(["postconf", "-M"], "reading master.cf"))
    wanted = parse_master(run(["postconf", "-c", ours, "-M"], "reading our master.cf"))
    for key in conflicting_services(current, wanted):
        run(["postconf", "-M#", key], f"commenting out {key} (it listens on one of our ports)")
        say(f"commented out the master.cf service {key}: chatmail's own listens on its port")
    changes = master_changes(current, wanted)
    if changes:
        run(["postconf", "-M", *changes], "postconf -M")
    run(["postfix", "check"], "postfix check")


def check_dovecot(layout: Layout) -> None:
    conf = layout.dovecot_config_dir / "dovecot.conf"
    run(["doveconf", "-c", str(conf), "-n"], f"doveconf -c {conf}")


# Postfix's master runs in postfix@-.service on Debian 12 (postfix.service is a oneshot
# wrapper there, where Restart=always is refused: the package's conffile drop-in is for
# the instance) and in postfix.service itself (Type=forking) from Debian 13 on.
POSTFIX_SUPERVISION = """\
# written by `chatmaild setup`: this release runs Postfix's master in postfix.service
# itself; it must come back by itself (a crashed MTA silently stops all delivery),
# after the filters it hands mail to
[Unit]
Wants=filtermail.service
After=filtermail.service

[Service]
Restart=always
RestartSec=30
"""
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def postfix_runs_in_main_unit(unit_dirs: tuple[Path, ...] = SYSTEM_UNIT_DIRS) -> bool:
    """Whether Debian's postfix.service runs the master itself (Debian 13 and later)."""
    for d in unit_dirs:
        unit = d / "postfix.service"
        if unit.is_file():
            return "\nType=forking" in unit.read_text()
    return False


def write_unit_dropins(config: Config) -> bool:
    """Write (or remove) the ini-derived drop-ins; True if anything changed."""
    wanted = unit_dropins(config)
    if postfix_runs_in_main_unit():
        wanted["postfix.service"] = POSTFIX_SUPERVISION
    changed = False
    for unit in (*DEFAULT_WRITABLE, *SOCKET_UNITS, "postfix.service", *RETIRED_UNITS):
        path = UNIT_DIR / f"{unit}.d" / DROPIN_NAME
        text = wanted.get(unit)
        if text is None:
            if path.exists():
                path.unlink()
                changed = True
                try:
                    path.parent.rmdir()
                except OSError:
                    pass
            continue
        if path.exists() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        changed = True
        say(f"wrote {path}")
    return changed


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def start_sockets() -> None:
    """The socket units listening, so that restarts of their daemons keep the sockets.

    One not listening yet (a first setup, or an upgrade from a version whose daemon
    bound its own sockets and removes their files when it stops): its daemon goes
    first.  A listening one is left alone: after moving a socket in chatmail.ini,
    `systemctl restart <unit>` binds the new path (README.Debian)."""
    for unit, (service, _) in SOCKET_UNITS.items():
        active = subprocess.run(["systemctl", "is-active", "--quiet", unit],
                                stdin=subprocess.DEVNULL)  # fmt: skip
        if active.returncode == 0:
            continue
        run(["systemctl", "stop", service], f"stopping {service}")
        run(["systemctl", "start", unit], f"starting {unit}")


def restart_everything() -> None:
    """Daemons first (Dovecot and Postfix need them), then the servers, then the web
    process (port 993 is its since the IMAP front); timers on."""
    run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
    # an earlier version's per-role units would hold the sockets; gone or not, no error
    subprocess.run(
        ["systemctl", "disable", "--now", "--quiet", *RETIRED_UNITS],
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    run(
        ["systemctl", "enable", "--quiet", *SOCKET_UNITS, *DAEMON_UNITS, *TIMER_UNITS],
        "systemctl enable",
    )
    start_sockets()
    daemons = [u for u in DAEMON_UNITS if u not in WEB_UNITS]
    run(["systemctl", "restart", *daemons], "restarting chatmail's daemons")
    # Dovecot restarts (2.4.1's master crashes when reloaded under LMTP load); Postfix
    # reloads, so its deliveries in flight finish (a stopped one starts)
    run(["systemctl", "restart", DOVECOT_UNIT], "restarting Dovecot")
    run(["systemctl", "reload-or-restart", POSTFIX_UNIT], "reloading Postfix")
    run(["systemctl", "restart", *WEB_UNITS], "restarting the web process")
    run(["systemctl", "enable", "--quiet", *TURN_UNITS], "enabling coturn")
    run(["systemctl", "restart", *TURN_UNITS], "restarting coturn")
    run(["systemctl", "start", *TIMER_UNITS], "starting the timers")
    # the first certificate from the CA now, not at the timer's first hour; it asks the
    # CA only when the served certificate needs it, so a rerun costs the CA nothing
    run(["systemctl", "start", "--no-block", "chatmail-acme.service"], "starting chatmail-acme")


def setup(config: Config, *, restart: bool) -> str:
    """Every step; returns the DNS records to publish."""
    try:
        pwd.getpwnam(config.vmail_user)
    except KeyError:
        raise SetupError(
            f"no user {config.vmail_user} (vmail_user): the package's postinst creates it"
        ) from None
    ensure_directories(config)
    # root's alone: systemd hands chatmail-dict a copy (LoadCredential), coturn's
    # configuration (root:turnserver) has it too
    secret = Path(config.turn_secret_path)
    if not secret.exists():
        ensure_secret(secret)
        record_created(secret)  # purge removes it
    ensure_tls(config)
    dkim_txt = ensure_dkim(config)
    nodelay = ensure_nodelay()
    # the package's /usr/lib/sysctl.d/60-chatmaild.conf, applied now, not at the next boot
    raise_kernel_limits(_SAY_LOG)
    layout = Layout.production(config).with_(nodelay_so=nodelay)
    render_all(config, layout)
    say(f"rendered {layout.postfix_config_dir} and {layout.dovecot_config_dir}")
    check_dovecot(layout)
    apply_postfix(layout)
    say("applied chatmail's settings to /etc/postfix/main.cf and master.cf with postconf")
    dropins_changed = write_unit_dropins(config)
    if restart and systemd_running():
        restart_everything()
        say("restarted chatmail's daemons and Dovecot, reloaded Postfix")
    elif dropins_changed and systemd_running():
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
    return dns_records(config, dkim_txt)


SETUP_DOC = """configure Postfix, Dovecot and the units from chatmail.ini
Run after changing chatmail.ini (dpkg-reconfigure chatmaild runs it too); the
package's postinst runs it on every install and upgrade.  Creates the mail store
directories, a self-signed certificate unless tls_external_cert_and_key is set,
the DKIM key; renders /etc/chatmail/postfix and /etc/chatmail/dovecot; applies
the Postfix settings to /etc/postfix/main.cf and master.cf with postconf (the
files as they were before the first setup are kept for purge); writes unit
drop-ins where chatmail.ini moves the mail store or a socket; restarts the
daemons, Dovecot and Postfix; prints the DNS records to publish.  Keys,
certificates and mail are kept.  Needs root."""


def cmd_setup(args: argparse.Namespace) -> int:
    from chatmaild.admin.main import config_from_args

    config = config_from_args(args)
    if os.geteuid() != 0:
        print(f"{PROG} setup: run as root", file=sys.stderr)
        return 1
    try:
        records = setup(config, restart=not args.no_restart)
    except (SetupError, ConfigError, OSError) as e:
        print(f"{PROG} setup: {e}", file=sys.stderr)
        return 1
    print()
    print(records)
    return 0


def _subcommand(subparsers, name: str, doc: str):
    """A subcommand whose help is ``doc``'s first line, its description the rest."""
    summary, _, body = doc.partition("\n")
    return subparsers.add_parser(
        name,
        help=summary,
        description=summary + "\n\n" + body,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_cli(subparsers) -> None:
    p = _subcommand(subparsers, "setup", SETUP_DOC)
    p.add_argument(
        "--no-restart",
        action="store_true",
        help="change files only; restart nothing (the package's postinst restarts itself)",
    )
    p.set_defaults(func=cmd_setup)


DNS_DOC = """print the DNS records to publish, or check what DNS answers for them
Prints a BIND zone fragment: A/AAAA (a reminder), MX, SPF, DMARC, DKIM (from
dkim_key_path), SRV for IMAP and submission, MTA-STS, TLS-RPT (with acme_email)
and CAA (with Let's Encrypt).  With --check, asks DNS for every record and prints
ok, missing or wrong (what it found, what it expected); exits 1 on any problem."""


def _dkim_txt(config: Config) -> str | None:
    from chatmaild.filtermail.dkim import public_value, txt_record

    try:
        return txt_record(public_value(Path(config.dkim_key_path).read_bytes()))
    except (OSError, ValueError):
        return None


def cmd_dns(args: argparse.Namespace) -> int:
    from chatmaild.admin.main import config_from_args

    config = config_from_args(args)
    dkim = _dkim_txt(config)
    if not args.check:
        print(dns_records(config, dkim))
        if dkim is None:
            print(f"; no DKIM key readable at {config.dkim_key_path}: run as root after setup")
        return 0
    findings = dnsrecords.check(dnsrecords.records(config, dkim), args.resolver)
    print(dnsrecords.report(findings))
    if dkim is None:
        print(f"missing DKIM: no key readable at {config.dkim_key_path}")
        return 1
    return 0 if all(f.status == "ok" for f in findings) else 1


def add_dns_cli(subparsers) -> None:
    p = _subcommand(subparsers, "dns", DNS_DOC)
    p.add_argument("--check", action="store_true", help="ask DNS and compare")
    p.add_argument("--resolver", metavar="HOST[:PORT]",
                   help="the DNS server to ask (default: the system's)")  # fmt: skip
    p.set_defaults(func=cmd_dns)
