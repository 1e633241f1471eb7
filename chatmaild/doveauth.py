"""Dovecot passdb/userdb dict that creates accounts on first login.

Dovecot asks over a UNIX socket (``passdb`` and ``userdb`` with ``driver = dict``).
For an existing account doveauth answers the stored password hash and Dovecot
verifies the password itself; an unknown address is created on the spot when
registration is open (no nocreate file), the password is long enough, the
localpart is valid and the machine is not overloaded.

Keys on the wire (Dovecot adds the ``shared/`` prefix):

    shared/passdb/<password>"<user>    password and user escaped with %E
    shared/userdb/<user>

Iterating ``shared/userdb/`` lists every account (``doveadm user -A``).

LOG LINES
    Created address: ADDR
    registration rejected: REASON: ADDR

FILES
    /etc/chatmail/chatmail.ini    configuration (doveauth_socket, mailboxes_dir, ...)
    /etc/chatmail-nocreate        when present, no accounts are created

SIGNALS
    SIGTERM, SIGINT    finish requests in flight, then exit 0

OPERATOR TOOL
    doveauth [--config PATH] lookup ADDR    ask the running daemon about ADDR
"""

from __future__ import annotations

import asyncio
import json
import sys

from .auth import AuthService
from .config import Config
from .dictproxy import DictDaemon, ProtocolError
from .service import Endpoint, run_daemon

__all__ = ["AuthService", "DoveauthDaemon", "main", "split_escaped_key"]


def split_escaped_key(rest: str) -> list[str]:
    """Split ``%E``-escaped fields separated by unescaped ``"``; backslash quotes one char."""
    if "\\" not in rest:
        return rest.split('"')  # nothing escaped: the common case, done in C
    fields: list[str] = []
    current: list[str] = []
    it = iter(rest)
    for c in it:
        if c == "\\":
            nxt = next(it, None)
            if nxt is None:
                raise ProtocolError("key ends in a lone backslash")
            current.append(nxt)
        elif c == '"':
            fields.append("".join(current))
            current = []
        else:
            current.append(c)
    fields.append("".join(current))
    return fields


class DoveauthDaemon(DictDaemon):
    name = "doveauth"

    def __init__(self, config: Config, args=None) -> None:
        super().__init__(config, args)
        self.auth = AuthService(config)

    def endpoint(self) -> Endpoint:
        # Dovecot's auth process connects as dovecot/root; vmail owns the socket
        return Endpoint.unix(self.config.doveauth_socket, mode=0o666)

    async def lookup(self, key: str, user: str | None) -> str | None:
        namespace, _, rest = key.partition("/")
        kind, _, rest = rest.partition("/")
        if namespace != "shared" or kind not in ("passdb", "userdb"):
            raise ProtocolError(f"unsupported key {key[:80]!r}")
        fields = split_escaped_key(rest)
        if kind == "userdb":
            answer = self.auth.userdb(fields[0])
        else:
            if len(fields) != 2:
                raise ProtocolError('passdb key needs <password>"<user>')
            password, username = fields
            known = self.auth.userdb(username)
            if known is not None and not self.auth.store.account(username).is_disabled:
                answer = known  # fast path: no thread for existing accounts
            else:
                # hashing and the creation lock block: keep them off the event loop
                answer = await asyncio.to_thread(self.auth.passdb, username, password)
        return json.dumps(answer) if answer is not None else None

    async def iterate(self, flags, max_rows, paths, user):
        if paths and paths[0].rstrip("/") == "shared/userdb":
            return [(f"shared/userdb/{addr}", "") for addr in self.auth.store.iter_addresses()]
        return []


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "lookup" in args:  # `doveauth [-c INI] lookup ADDR`: the operator tool, not the daemon
        from .admin import main as admin_main

        i = args.index("lookup")
        return admin_main([*args[:i], "doveauth", *args[i:]])
    return run_daemon(DoveauthDaemon, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
