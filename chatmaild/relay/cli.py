"""``chatmaild render`` and ``chatmaild dev`` (also ``python -m chatmaild.relay``).

``render`` writes the production Postfix/Dovecot configuration for the
chatmail.ini given with ``--config`` below ``--root`` (``/``: /etc/chatmail/postfix
and /etc/chatmail/dovecot, which ``chatmaild setup`` renders and applies).

``dev`` runs a complete relay on 127.0.0.1 in a state directory: real
Postfix and Dovecot, every chatmaild daemon, self-signed TLS.  It prints one
ready block with the ports, a fresh ``dclogin:`` link and the ``DCACCOUNT:``
URL, writes the same facts to ``<state>/relay.json`` and stops everything on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from chatmaild.common.config import ConfigError
from chatmaild.relay.render import CHECKOUT_ROOT, Layout, render_all
from chatmaild.relay.stack import Relay, RelayError, available_components

PROG = "chatmaild"
SECTION = "params"


def read_overrides(path: str | None) -> dict[str, str]:
    """The [params] of a user's ini, as raw strings (validated when the relay reads them)."""
    if not path:
        return {}
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if not parser.has_section(SECTION):
        raise ConfigError(f"{path}: missing section [{SECTION}]")
    return dict(parser.items(SECTION))


# where a state directory lives when the one asked for is out of the servers' reach
PRIVATE_STATE_HOME = Path("/var/lib/chatmaild-dev")


def traversable(path: Path) -> bool:
    """Whether users without special rights (postfix, dovecot, vmail) reach ``path``."""
    try:
        return all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents) if p.exists())
    except OSError:
        return False


def reachable_state_dir(state: Path) -> Path:
    """``state`` itself, or a directory the mail servers can reach that ``state`` links to.

    A checkout in /root (mode 0700) is where root's clone lands; ``./state`` there is
    out of reach for Postfix, Dovecot and vmail.  Then the state lives below
    PRIVATE_STATE_HOME and ``state`` becomes a symlink to it, so a restart finds it.
    """
    if state.is_symlink() or traversable(state):
        return state.resolve()
    if state.exists():
        raise RelayError(
            f"{state} is out of reach for the mail servers (a directory above it is not "
            f"traversable by other users); remove it to let it become a link to a directory "
            f"below {PRIVATE_STATE_HOME}, or choose another STATE="
        )
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:8]
    target = PRIVATE_STATE_HOME / f"{state.name}-{digest}"
    target.mkdir(parents=True, exist_ok=True)
    for d in (PRIVATE_STATE_HOME, target):
        os.chmod(d, 0o755)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.symlink_to(target, target_is_directory=True)
    return target


def ready_text(relay: Relay, seconds: float) -> str:
    from chatmaild.web.main import dcaccount_url, dclogin_url

    p, host = relay.ports, relay.host
    addr, password = relay.new_credentials()
    link = dclogin_url(
        addr,
        password,
        imap_host=host,
        imap_port=int(p["imaps"]),
        smtp_host=host,
        smtp_port=int(p["submissions"]),
    )
    lines = [
        f"chatmail relay {relay.mail_domain} ready in {seconds:.1f} s "
        f"(state {relay.state_dir}, logs {relay.log_dir})",
        f"  IMAP {host}:{p['imaps']} (TLS) {host}:{p['imap']} (STARTTLS)   "
        f"submission {host}:{p['submissions']} (TLS) {host}:{p['submission']} (STARTTLS)   "
        f"MTA {host}:{p['smtp']}"
        + (f"   TURN {host}:{p['turn']} (UDP, TCP)" if "turn" in relay.components else ""),
    ]
    if "newemail" in relay.components:
        web = f"{host}:{p['newemail']}"
        lines.append(f"  home page https://{web}/   onboarding https://{web}/new")
        if not relay.config.is_ip_domain:  # the apps open it only with a trusted certificate
            lines.append(f"  {dcaccount_url(web)}")
    lines.append(f"  new account: {link}")
    lines.append(f"  facts for scripts: {relay.json_path}    Ctrl-C stops the relay")
    return "\n".join(lines)


def run_dev(
    state: str, config: str | None, nodelay: bool | None = None, peers: list[str] | None = None
) -> int:
    from chatmaild.relay.dns import LoopbackDNS
    from chatmaild.relay.peers import PeerError, PeerLinks

    state_dir = Path(state).absolute()
    dns = LoopbackDNS().start()  # DKIM keys of this relay and its peers, for filtermail
    try:
        overrides = read_overrides(config)
        overrides.setdefault("dns_resolver", dns.address)
        state_dir = reachable_state_dir(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        relay = Relay(
            state_dir,
            overrides,
            available_components(),
            nodelay=nodelay,
            reuse_ports=True,
            supervise=True,
        )
        links = PeerLinks(relay, dns, [Path(p).absolute() for p in peers or ()])
    except (ConfigError, RelayError, OSError) as e:
        dns.stop()
        print(f"{PROG} dev: {e}", file=sys.stderr)
        return 78 if isinstance(e, ConfigError) else 1

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        relay.start()
    except RelayError as e:
        dns.stop()
        print(f"{PROG} dev: relay did not start: {e}", file=sys.stderr)
        return 1
    try:
        links.publish_own_key()
        links.register()
        links.refresh()
        print(ready_text(relay, time.monotonic() - start), flush=True)
        while not stop.wait(1):
            links.refresh()
        print("stopping...", flush=True)
    except (PeerError, OSError) as e:
        print(f"{PROG} dev: {e}", file=sys.stderr)
        return 1
    finally:
        # a second Ctrl-C while stopping must not leave half the relay running
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        relay.stop()
        dns.stop()
    print("stopped; no process of this relay is left", flush=True)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    return run_dev(
        args.state,
        args.dev_config,
        nodelay=False if args.no_nodelay else None,
        peers=args.peers,
    )


def cmd_render(args: argparse.Namespace) -> int:
    from chatmaild.common.service import load_config_or_exit

    config = load_config_or_exit(args.config, PROG)
    layout = Layout.production(config)
    try:
        written = render_all(config, layout, prefix=Path(args.root))
    except ConfigError as e:
        print(f"{PROG} render: {args.config}: {e}", file=sys.stderr)
        return 78
    for path in written:
        print(path)
    return 0


def add_dev_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        default=os.environ.get("STATE") or "state",
        help="state directory (default: $STATE or ./state)",
    )
    parser.add_argument(
        "--config",
        dest="dev_config",
        default=os.environ.get("CONFIG") or None,
        metavar="INI",
        help="chatmail.ini whose [params] override the local defaults (default: $CONFIG)",
    )
    parser.add_argument(
        "--peer",
        dest="peers",
        action="append",
        default=[],
        metavar="STATE",
        help="state directory of another local relay to exchange mail with (repeatable); "
        "the other relay links back",
    )
    parser.add_argument(
        "--no-nodelay",
        action="store_true",
        help="run stock Dovecot without the no-delay shim (slower IDLE notifications)",
    )


def add_cli(subparsers) -> None:
    """Register ``render`` and ``dev`` on the ``chatmaild`` command."""
    p = subparsers.add_parser(
        "render",
        help="write the Postfix/Dovecot configuration for chatmail.ini",
        description="Render the production Postfix and Dovecot configuration from the\n"
        "chatmail.ini given with --config into ROOT/etc/chatmail/postfix and dovecot\n"
        "(chatmaild setup renders it and applies it to Postfix and Dovecot).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", default="/", help="directory to write below (default: /)")
    p.set_defaults(func=cmd_render)
    if not (CHECKOUT_ROOT / "pyproject.toml").exists():
        return  # the installed package: `dev` runs a relay from a source checkout only
    p = subparsers.add_parser(
        "dev",
        help="run a complete local relay on 127.0.0.1 (make run)",
        description=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dev_arguments(p)
    p.set_defaults(func=cmd_dev)


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser(
        prog="python -m chatmaild.relay",
        description=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dev_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return cmd_dev(args)
