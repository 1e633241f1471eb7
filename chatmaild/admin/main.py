"""operator command for a chatmail relay: configuration, accounts, registration.

Usage: chatmaild [--config PATH] COMMAND [ARGS...]; ``chatmaild COMMAND --help``
describes each command.

COMMANDS
    config                       print the effective configuration as an ini
                                 file, every key with its doc and value
    accounts [-l]                list account addresses (-l: last login, flags)
    account show ADDR            show one account
    account create ADDR          create an account; prints the password once
    account disable|enable ADDR  refuse or allow the account's logins
    account delete ADDR          remove the account and all its mail
    registration block|unblock|status
                                 stop or allow creation of new accounts on
                                 first login (the nocreate file)
    status [--json]              whether the relay is healthy: units, certificate,
                                 queue, disk, expiry, push backlog (exit 1 if not)
    doveauth lookup ADDR         ask the running doveauth what Dovecot would get
                                 (also: doveauth-lookup ADDR)

Commands of other components (rendering configs, DKIM keys, ...) appear here
when their modules are installed; see EXTRA_COMMANDS in chatmaild/admin.py.

Commands that change accounts switch to the vmail user (vmail_user) when run
as root, so files keep the owner Dovecot expects.

FILES
    /etc/chatmail/chatmail.ini   configuration (override with --config or CHATMAIL_INI)
    /etc/chatmail-nocreate       registration is blocked while this file exists

EXIT STATUS
    0   success
    1   the account (or lookup result) does not exist, or the change was refused
    2   usage error
    78  the configuration is invalid
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import importlib
import json
import logging
import secrets
import string
import sys
from collections.abc import Callable

from chatmaild.common.accounts import FLAG_DISABLED, Account, AccountStore, drop_privileges
from chatmaild.common.addr import AddressError, canonical_address, check_creatable
from chatmaild.common.config import Config, config_fields, deprecation_warning
from chatmaild.common.service import load_config_or_exit, make_parser

PROG = "chatmaild"

# Other areas add subcommands here: each "module:function" is imported if it
# can be, and the function is called with the argparse subparsers object.  A
# subcommand sets ``func=handler`` via set_defaults; handler(args) -> exit
# status, and may call :func:`config_from_args` for the validated Config.
EXTRA_COMMANDS: list[str] = [
    "chatmaild.relay.cli:add_cli",
    "chatmaild.relay.system:add_cli",
    "chatmaild.relay.system:add_dns_cli",
    "chatmaild.filtermail.cli:add_cli",
    "chatmaild.admin.status:add_cli",
]

log = logging.getLogger(PROG)

Handler = Callable[[argparse.Namespace], int]


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated configuration named by --config (exits 78 when invalid)."""
    return load_config_or_exit(args.config, PROG)


def _subparser(subparsers, name: str, doc: str, func: Handler, **kw) -> argparse.ArgumentParser:
    summary, _, body = doc.strip().partition("\n")
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=summary + ("\n\n" + body.strip("\n") if body.strip() else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )
    parser.set_defaults(func=func)
    return parser


# ---------------------------------------------------------------- config


def render_config(config: Config) -> str:
    """The effective configuration as an ini text, each key preceded by its doc."""
    lines = [
        "# effective chatmail configuration (defaults filled in)",
        "[params]",
    ]
    for key, value, doc in config.as_ini_items():
        lines.append("")
        lines.append(f"# {doc}")
        lines.append(f"{key} = {value}")
    if config.unknown_keys:
        lines.append("")
        lines.append("# unknown keys (ignored): " + ", ".join(config.unknown_keys))
    if config.deprecated_keys:
        lines.append("")
        lines.append("# " + deprecation_warning(config.deprecated_keys))
    return "\n".join(lines) + "\n"


def cmd_config(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.key:
        known = {f.name for f in config_fields()}
        if args.key not in known:
            print(f"{PROG}: unknown config key {args.key!r}", file=sys.stderr)
            return 1
        value = {k: v for k, v, _ in config.as_ini_items()}[args.key]
        print(value)
        return 0
    sys.stdout.write(render_config(config))
    return 0


# ---------------------------------------------------------------- accounts


def _date(ts: int | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d")


def _store(args: argparse.Namespace, *, write: bool = False) -> AccountStore:
    config = config_from_args(args)
    if write:
        drop_privileges(config.vmail_user)
    return AccountStore(config)


def _canonical(store: AccountStore, raw: str) -> str | None:
    try:
        return canonical_address(raw, store.config.mail_domain)
    except AddressError as e:
        print(f"{PROG}: {raw!r} is not an address of this relay: {e}", file=sys.stderr)
        return None


def _existing_account(store: AccountStore, raw: str) -> Account | None:
    """The account for ``raw``, or None after telling the operator why not."""
    addr = _canonical(store, raw)
    if addr is None:
        return None
    account = store.account(addr)
    if not account.exists:
        print(f"{PROG}: no account {addr}", file=sys.stderr)
        return None
    return account


def cmd_accounts(args: argparse.Namespace) -> int:
    store = _store(args)
    for addr in store.iter_addresses():
        if not args.long:
            print(addr)
            continue
        account = store.account(addr)
        flags = []
        if account.is_disabled:
            flags.append("disabled")
        if account.enforces_e2ee_incoming:
            flags.append("e2ee-incoming")
        print(f"{addr}\t{_date(account.last_login())}\t{','.join(flags) or '-'}")
    return 0


def cmd_account_show(args: argparse.Namespace) -> int:
    store = _store(args)
    account = _existing_account(store, args.addr)
    if account is None:
        return 1
    addr = account.addr
    print(f"address:              {addr}")
    print(f"home:                 {account.home}")
    print(f"last login:           {_date(account.last_login())}")
    print(f"disabled:             {'yes' if account.is_disabled else 'no'}")
    print(f"refuses cleartext in: {'yes' if account.enforces_e2ee_incoming else 'no'}")
    return 0


def generate_password(min_length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(max(min_length + 3, 20)))


def _read_password(args: argparse.Namespace, min_length: int) -> str | None:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif args.prompt:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print(f"{PROG}: the passwords differ", file=sys.stderr)
            return None
    else:
        return generate_password(min_length)
    if len(password) < min_length:
        print(f"{PROG}: password shorter than {min_length} characters", file=sys.stderr)
        return None
    return password


def cmd_account_create(args: argparse.Namespace) -> int:
    store = _store(args, write=True)
    config = store.config
    addr = _canonical(store, args.addr)
    if addr is None:
        return 1
    try:
        check_creatable(addr, config.username_min_length, config.username_max_length)
    except AddressError as e:
        print(f"{PROG}: cannot create {addr}: {e}", file=sys.stderr)
        return 1
    if store.account(addr).exists:
        print(f"{PROG}: account {addr} already exists", file=sys.stderr)
        return 1
    password = _read_password(args, config.password_min_length)
    if password is None:
        return 1
    result = store.create(addr, password)
    if not result.created:
        print(f"{PROG}: account {addr} already exists", file=sys.stderr)
        return 1
    log.info("Created address: %s", addr)
    print(f"address:  {addr}")
    if not (args.prompt or args.password_stdin):
        print(f"password: {password}")
    return 0


def _set_disabled(args: argparse.Namespace, disabled: bool) -> int:
    store = _store(args, write=True)
    account = _existing_account(store, args.addr)
    if account is None:
        return 1
    addr = account.addr
    account.set_flag(FLAG_DISABLED, disabled)
    log.info("account %s: %s", "disabled" if disabled else "enabled", addr)
    print(f"{addr}: {'disabled' if disabled else 'enabled'}")
    return 0


def cmd_account_disable(args: argparse.Namespace) -> int:
    return _set_disabled(args, True)


def cmd_account_enable(args: argparse.Namespace) -> int:
    return _set_disabled(args, False)


def cmd_account_delete(args: argparse.Namespace) -> int:
    store = _store(args, write=True)
    addr = _canonical(store, args.addr)
    if addr is None:
        return 1
    if not store.delete(addr):
        print(f"{PROG}: no account {addr}", file=sys.stderr)
        return 1
    log.info("account deleted: %s", addr)
    print(f"{addr}: deleted")
    return 0


# ---------------------------------------------------------------- registration


def cmd_registration(args: argparse.Namespace) -> int:
    store = AccountStore(config_from_args(args))
    if args.action == "block":
        store.set_registration_blocked(True)
    elif args.action == "unblock":
        store.set_registration_blocked(False)
    state = "blocked" if store.registration_blocked else "open"
    print(f"registration {state} ({store.config.nocreate_file})")
    return 0


def cmd_stale_locks(args: argparse.Namespace) -> int:
    from chatmaild.expire.maildir import remove_stale_uidlist_locks, stale_uidlist_locks

    config = config_from_args(args)
    if args.remove:
        paths = remove_stale_uidlist_locks(config.mailboxes_dir, args.min_age)
    else:
        paths = stale_uidlist_locks(config.mailboxes_dir, args.min_age)
    for path in paths:
        print(f"{'removed' if args.remove else 'stale'}: {path}")
    return 0


# ---------------------------------------------------------------- doveauth lookup


def doveauth_lookup(socket_path: str, addr: str, timeout: float = 10.0) -> str:
    """Send a userdb LOOKUP to doveauth; return the raw reply line (O..., N or F)."""
    import socket

    from chatmaild.dictd.proxy import tabescape

    escaped = addr.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    request = f"H3\t2\t0\t\tauth\nL{tabescape('shared/userdb/' + escaped)}\t{tabescape(addr)}\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(request.encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", "replace").rstrip("\n")


def cmd_doveauth_lookup(args: argparse.Namespace) -> int:
    from chatmaild.dictd.proxy import tabunescape

    config = config_from_args(args)
    path = args.socket or config.doveauth_socket
    try:
        reply = doveauth_lookup(path, args.addr)
    except OSError as e:
        print(f"{PROG}: cannot ask doveauth at {path}: {e}", file=sys.stderr)
        return 2
    if reply.startswith("O"):
        fields = json.loads(tabunescape(reply[1:]))
        fields.pop("password", None)  # never show hashes on a terminal by default
        print(json.dumps(fields, indent=2, sort_keys=True))
        return 0
    if reply == "N":
        print(f"{PROG}: doveauth: no account {args.addr}", file=sys.stderr)
        return 1
    print(f"{PROG}: doveauth answered {reply!r}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- parser


def _add_addr(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("addr", metavar="ADDR", help="the account's address, localpart@domain")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, __doc__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _subparser(
        subparsers,
        "config",
        """print the effective configuration
Every key of the [params] section with its doc line and its value after
defaults are applied; the output is a valid chatmail.ini.  With KEY, print
only that key's value.""",
        cmd_config,
    )
    p.add_argument("key", nargs="?", metavar="KEY", help="print only this key's value")

    p = _subparser(
        subparsers,
        "accounts",
        """list accounts
One address per line, sorted.  With -l also the last login day (UTC) and the
flags: disabled, e2ee-incoming (cleartext mail from outside is refused),
no-password (a directory without a usable password file).""",
        cmd_accounts,
    )
    p.add_argument("-l", "--long", action="store_true", help="show last login and flags")

    account = subparsers.add_parser(
        "account",
        help="show, create, disable, enable or delete one account",
        description="Manage one account; see the actions' --help.",
    )
    actions = account.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_addr(
        _subparser(
            actions,
            "show",
            """show an account
Address, home directory, last login day (UTC) and flags.  Exit 1 if there is
no such account.""",
            cmd_account_show,
        )
    )
    p = _subparser(
        actions,
        "create",
        """create an account
The address must satisfy the creation rules (localpart a-z 0-9 . _ -, length
within username_min_length..username_max_length, this relay's domain); the
nocreate file does not apply to operators.  Without options a random password
is generated and printed once: it is not stored anywhere in clear.""",
        cmd_account_create,
    )
    _add_addr(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--prompt", action="store_true", help="ask for the password (twice)")
    how.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line"
    )
    _add_addr(
        _subparser(
            actions,
            "disable",
            """disable an account
Logins are refused and filtermail drops its mail (the DISABLED flag file);
the mailbox is kept.  Undo with `enable`.""",
            cmd_account_disable,
        )
    )
    _add_addr(
        _subparser(
            actions,
            "enable",
            "enable a disabled account\nRemoves the DISABLED flag.",
            cmd_account_enable,
        )
    )
    _add_addr(
        _subparser(
            actions,
            "delete",
            """delete an account and all its mail
The directory is first renamed away, so Dovecot never sees half an account,
then removed.  The address can be registered again afterwards.""",
            cmd_account_delete,
        )
    )

    p = _subparser(
        subparsers,
        "registration",
        """block or allow creation of new accounts
`block` creates the nocreate file (config key nocreate_file): first logins of
unknown addresses are refused while existing accounts keep working.
`unblock` removes it; `status` only reports.""",
        cmd_registration,
    )
    p.add_argument("action", choices=["block", "unblock", "status"], metavar="block|unblock|status")

    p = _subparser(
        subparsers,
        "stale-locks",
        """list (or remove) Dovecot uidlist locks a killed process left
A dovecot-uidlist.lock that holds no PID and is older than --min-age seconds
is what a process killed while rewriting the folder's uidlist left behind.
Dovecot waits two minutes before it takes such a lock over, and every SELECT
and delivery into that folder waits as long.  dovecot.service runs this with
--remove before each start, when no Dovecot process can hold one.""",
        cmd_stale_locks,
    )
    p.add_argument("--remove", action="store_true", help="remove them (default: list)")
    p.add_argument("--min-age", type=float, default=2.0, metavar="SECONDS",
                   help="only locks older than this (default: %(default)s)")  # fmt: skip

    lookup_doc = """ask the running doveauth about an address
Sends the userdb lookup Dovecot would send over doveauth_socket and prints the
answer as JSON (without the password hash).  Exit 1 if doveauth answers
"not found", 2 if it cannot be reached or fails."""
    p = _subparser(subparsers, "doveauth-lookup", lookup_doc, cmd_doveauth_lookup)
    _add_addr(p)
    p.add_argument("--socket", metavar="PATH", help="doveauth socket (default: doveauth_socket)")
    doveauth = subparsers.add_parser(
        "doveauth", help="doveauth tools", description="Tools for the doveauth daemon."
    )
    dsub = doveauth.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _subparser(dsub, "lookup", lookup_doc, cmd_doveauth_lookup)
    _add_addr(p)
    p.add_argument("--socket", metavar="PATH", help="doveauth socket (default: doveauth_socket)")

    for entry in EXTRA_COMMANDS:
        _add_extra(subparsers, entry)
    return parser


def _add_extra(subparsers, entry: str) -> None:
    """Let another module register its subcommands; a missing module is skipped."""
    module_name, _, func_name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return  # that component is not part of this installation
        print(f"{PROG}: commands of {module_name} unavailable: {e}", file=sys.stderr)
        return
    except Exception as e:  # a broken plugin must not take the other commands down
        print(f"{PROG}: commands of {module_name} unavailable: {e!r}", file=sys.stderr)
        return
    try:
        getattr(module, func_name or "add_cli")(subparsers)
    except Exception as e:
        print(f"{PROG}: commands of {module_name} unavailable: {e!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from chatmaild.common.service import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(PROG, verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except (LookupError, PermissionError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
