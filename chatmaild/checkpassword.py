"""Dovecot checkpassword program over the chatmail account store.

For Dovecot set-ups that use ``passdb { driver = checkpassword }`` (and
optionally ``userdb { driver = checkpassword }``) instead of the doveauth dict.
Dovecot runs it once per lookup as

    chatmail-checkpassword [--config PATH] REPLY-PROGRAM [ARGS...]

and writes ``user NUL password NUL timestamp NUL`` (at most 512 bytes) to file
descriptor 3.  The same rules as doveauth apply: an unknown address is created
on first login when registration is open, the password is long enough, the
localpart is valid and the machine is not overloaded; otherwise the stored
password is verified here.  On success the program executes REPLY-PROGRAM
(Dovecot's checkpassword-reply) with USER, HOME and the userdb fields
(userdb_uid, userdb_gid) in the environment.

When Dovecot sets AUTHORIZED=1 it asks for a lookup without a password (a
userdb lookup, or a passdb lookup with CREDENTIALS_LOOKUP=1): the account is
answered if it exists (a disabled account only to userdb lookups) and
AUTHORIZED=2 is passed on, as Dovecot requires.

Started as root, the program works on the store with the effective ids of
the vmail user (config key vmail_user), so files get the owner Dovecot
expects, and switches back before executing REPLY-PROGRAM (Dovecot's
checkpassword-reply refuses to run under a changed uid).

LOG LINES (stderr, which Dovecot copies to its log)
    Created address: ADDR
    registration rejected: REASON: ADDR

ENVIRONMENT
    CHATMAIL_INI    chatmail.ini to read when --config is not given

EXIT STATUS
    (exec)  success: REPLY-PROGRAM runs and reports the fields to Dovecot
    1       wrong password, unknown or disabled account, creation refused
    2       misuse: no REPLY-PROGRAM, or no NUL-separated input on fd 3
    3       lookup (AUTHORIZED=1) of an account that does not exist
    111     temporary failure: configuration, store or system error
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_FAILURE = 1
EXIT_MISUSE = 2
EXIT_UNKNOWN_USER = 3
EXIT_TEMPFAIL = 111
MAX_INPUT = 512  # the checkpassword interface's limit
INPUT_FD = 3

log = logging.getLogger("chatmail-checkpassword")


class CheckpasswordExit(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_input(data: bytes) -> tuple[str, str]:
    """``user NUL password NUL [timestamp NUL ...]`` -> (user, password)."""
    if len(data) > MAX_INPUT:
        raise CheckpasswordExit(EXIT_MISUSE, f"more than {MAX_INPUT} bytes on fd {INPUT_FD}")
    parts = data.split(b"\0")
    if len(parts) < 3:
        raise CheckpasswordExit(EXIT_MISUSE, "input on fd 3 is not user\\0password\\0")
    try:
        return parts[0].decode("utf-8"), parts[1].decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpasswordExit(EXIT_FAILURE, "user or password is not UTF-8") from None


def read_input(fd: int = INPUT_FD) -> bytes:
    chunks = []
    size = 0
    try:
        while size <= MAX_INPUT:
            chunk = os.read(fd, MAX_INPUT + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise CheckpasswordExit(EXIT_MISUSE, f"cannot read fd {fd}: {e}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return b"".join(chunks)


def reply_environment(fields: dict[str, str], authorized: bool, credentials: bool) -> dict:
    """The environment checkpassword-reply turns into Dovecot passdb/userdb fields."""
    env = dict(os.environ)
    env["USER"] = fields["addr"]
    env["HOME"] = fields["home"]
    extra = {"userdb_uid": fields["uid"], "userdb_gid": fields["gid"]}
    if credentials:
        # passdb lookup without authentication: Dovecot checks the hash itself
        extra["password"] = fields["password"]
    env.update(extra)
    env["EXTRA"] = " ".join(extra)
    if authorized:
        env["AUTHORIZED"] = "2"  # tells checkpassword-reply the lookup succeeded
    return env


def preload() -> None:
    """Import now what the store code loads lazily: as vmail the Python library may be
    unreadable (e.g. an interpreter below /root)."""
    import codecs

    from . import auth, syslimits  # noqa: F401

    for name in ("ascii", "utf-8", "latin-1"):
        codecs.lookup(name)


def decide(config, user: str, password: str, environ: dict) -> dict:
    """Run the lookup or authentication; return the reply environment or raise."""
    from .accounts import verify_password
    from .auth import AuthService

    auth = AuthService(config)
    authorized = environ.get("AUTHORIZED") == "1"
    credentials = authorized and environ.get("CREDENTIALS_LOOKUP") == "1"
    if credentials:
        # passdb lookup without a password (Dovecot checks the hash): not for disabled accounts
        fields = auth.credentials(user)
        if fields is None:
            raise CheckpasswordExit(EXIT_UNKNOWN_USER, f"unknown or disabled user {user!r}")
    elif authorized:
        fields = auth.userdb(user)
        if fields is None:
            raise CheckpasswordExit(EXIT_UNKNOWN_USER, f"unknown user {user!r}")
    else:
        fields = auth.passdb(user, password)
        if fields is None:
            raise CheckpasswordExit(EXIT_FAILURE, "unknown user or creation refused")
        if not verify_password(password, fields["password"]):
            raise CheckpasswordExit(EXIT_FAILURE, f"password mismatch for {fields['addr']}")
    return reply_environment(fields, authorized, credentials)


def make_parser() -> argparse.ArgumentParser:
    # not service.make_parser: that pulls in asyncio, and this runs once per login
    from .config import add_config_arguments

    summary, _, body = __doc__.strip().partition("\n")
    parser = argparse.ArgumentParser(
        prog="chatmail-checkpassword",
        description=f"chatmail-checkpassword - {summary}\n{body}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument(
        "reply",
        nargs=argparse.REMAINDER,
        metavar="REPLY-PROGRAM [ARGS...]",
        help="program to execute on success (Dovecot appends checkpassword-reply)",
    )
    return parser


def setup_logging(verbose: bool) -> None:
    """stderr only: Dovecot's auth process copies a child's stderr into its log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("chatmail-checkpassword[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    from .accounts import drop_privileges
    from .config import ConfigError, read_config

    args = make_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        if not args.reply:
            raise CheckpasswordExit(EXIT_MISUSE, "usage: chatmail-checkpassword REPLY-PROGRAM")
        user, password = parse_input(read_input())
        try:
            config = read_config(args.config)
        except ConfigError as e:
            raise CheckpasswordExit(EXIT_TEMPFAIL, str(e)) from None
        preload()
        try:
            restore = drop_privileges(config.vmail_user, temporary=True)
        except (LookupError, OSError) as e:
            raise CheckpasswordExit(EXIT_TEMPFAIL, f"cannot switch to vmail_user: {e}") from None
        env = decide(config, user, password, dict(os.environ))
        # checkpassword-reply refuses to run under another uid than Dovecot's
        restore()
    except CheckpasswordExit as e:
        level = logging.ERROR if e.status in (EXIT_MISUSE, EXIT_TEMPFAIL) else logging.INFO
        log.log(level, "%s", e)
        return e.status
    except Exception:
        log.exception("temporary failure")
        return EXIT_TEMPFAIL
    sys.stdout.flush()
    try:
        os.execvpe(args.reply[0], args.reply, env)
    except OSError as e:
        log.error("cannot execute %s: %s", args.reply[0], e)
    return EXIT_TEMPFAIL


if __name__ == "__main__":
    raise SystemExit(main())
