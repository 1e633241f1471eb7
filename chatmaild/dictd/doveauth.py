"""Dovecot passdb/userdb that creates accounts on first login.

Dovecot asks over a UNIX socket.  For an existing account doveauth verifies
the password against the stored hash once and answers it in Dovecot's PLAIN
scheme, at later logins without hashing again (chatmaild.dictd.verified); a
wrong password gets the stored hash, which Dovecot verifies and refuses.  An unknown
address is created on the spot when registration is open (no nocreate file),
the password is long enough, the localpart is valid and the machine is not
overloaded.

doveauth answers two protocols with the same rules, each on its own socket:

- the dict protocol on doveauth_socket, for Dovecot 2.3's ``passdb`` and
  ``userdb`` with ``driver = dict``;
- HTTP on doveauth_http_socket (mode 0600: only the vmail user), for Dovecot
  2.4's Lua passdb/userdb (dovecot/auth.lua), which has neither the dict nor
  the checkpassword driver any more; see chatmaild.dictd.authhttp for the routes.

Dict keys on the wire (Dovecot adds the ``shared/`` prefix):

    shared/passdb/<password>"<user>    password and user escaped with %E
    shared/userdb/<user>

Iterating ``shared/userdb/`` lists every account (``doveadm user '*'``).
Only passdb answers carry the password hash; userdb answers (which Dovecot
passes on to doveadm, LMTP and mail processes) never do.

The socket is created mode 0600: its one client is Dovecot's auth-worker
process, which runs as the vmail user like doveauth (``service auth-worker``
in dovecot.conf).  Whoever can connect can list accounts, read hashes and
create accounts, so keep its directory private to vmail as well.

At start, accounts of the reference relay's old sqlite database
(passdb_path) are moved into the store once; the file is then renamed to
``<passdb_path>.old``.

LOG LINES
    Created address: ADDR
    registration rejected: REASON: ADDR

FILES
    /etc/chatmail/chatmail.ini    configuration (doveauth_socket, doveauth_http_socket,
                                  mailboxes_dir, ...)
    /etc/chatmail-nocreate        when present, no accounts are created

SIGNALS
    SIGTERM, SIGINT    finish requests in flight, then exit 0

OPERATOR TOOL
    doveauth [--config PATH] lookup ADDR    ask the running daemon about ADDR
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chatmaild.common import metrics
from chatmaild.common.accounts import AccountStore, hash_password, verify_password
from chatmaild.common.addr import AddressError
from chatmaild.common.config import Config
from chatmaild.common.service import (
    BoundUnixSocket,
    Endpoint,
    Server,
    open_listener,
    run_daemon,
    take_inherited,
)
from chatmaild.dictd.auth import NO_ACCOUNT, AuthService
from chatmaild.dictd.authhttp import AuthHttpResponder
from chatmaild.dictd.proxy import DictDaemon, ProtocolError
from chatmaild.dictd.verified import PLAIN_SCHEME, VerifiedLogins

__all__ = ["AuthService", "DoveauthDaemon", "main", "migrate_legacy_db", "split_escaped_key"]

log = logging.getLogger("doveauth")

# A creation hashes (CPU: libcrypt without the GIL, one thread per core is all that
# helps; more only fight over caches and the GIL) and then writes (mostly waiting for
# a journal commit: many overlap, and commits take several at once)
HASH_THREADS = len(os.sched_getaffinity(0))
WRITE_THREADS = 16
ACCOUNTS_RECOUNT = 600.0  # seconds between counts of the accounts (metrics on)


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


MIGRATION_SKIP_PREFIXES = ("ci-", "ac_")  # test accounts of the reference's CI
MIGRATION_PROGRESS = 10000


def migrate_legacy_db(config: Config, store: AccountStore | None = None) -> int:
    """Move accounts from the reference relay's old sqlite passdb into the store.

    Runs at every start and does nothing once ``passdb_path`` is gone: after a
    complete migration the database is renamed to ``<passdb_path>.old`` (and its
    WAL/SHM files removed).  Existing accounts are never overwritten, so an
    interrupted migration can simply run again.  Returns the accounts created.
    """
    path = Path(config.passdb_path)
    if not path.exists():
        return 0
    store = store or AccountStore.shared(config)
    log.info("migrating accounts from %s", path)
    created = 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)) as db:
        for n, row in enumerate(db.execute("SELECT * FROM users"), 1):
            addr, stored = str(row[0] or ""), str(row[1] or "")
            if addr.startswith(MIGRATION_SKIP_PREFIXES):
                continue
            try:
                result = store.create(addr, stored, password_is_hash=True, enforce_e2ee=False)
            except AddressError as e:
                log.warning("migration: skipping %r: %s", addr, e)
                continue
            if result.created:
                created += 1
                last_login = row[2] if len(row) > 2 else None
                if last_login:
                    result.account.set_last_login(int(last_login))
            if n % MIGRATION_PROGRESS == 0:
                log.info("migration: %d rows done", n)
    os.rename(path, f"{path}.old")
    for sibling in path.parent.glob(path.name + "-*"):  # -wal, -shm
        sibling.unlink(missing_ok=True)
    log.info("migrated %d accounts; %s renamed to %s.old", created, path, path)
    return created


class DoveauthDaemon(DictDaemon):
    name = "doveauth"

    def __init__(self, config: Config, args=None) -> None:
        super().__init__(config, args)
        self.auth = AuthService(config)
        self.http = AuthHttpResponder(config, self.passdb, self.userdb, self.all_users)
        self.http_server: Server | None = None
        self._http_file: BoundUnixSocket | None = None
        self.hashers = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="hash")
        self.writers = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="create")
        self.verified = VerifiedLogins()
        self._recount: asyncio.Task | None = None

    async def start(self) -> None:
        await asyncio.to_thread(migrate_legacy_db, self.config, self.auth.store)
        # the HTTP responder (Dovecot 2.4) runs next to the dict one, on its own socket
        # (systemd's from chatmail-dict.socket, open across restarts, or bound here)
        endpoint = Endpoint.unix(self.config.doveauth_http_socket, mode=0o600)
        sock, self._http_file = open_listener(endpoint, take_inherited(endpoint.path))
        stop_timeout = getattr(self.args, "stop_timeout", 30.0)
        self.http_server = Server(self.http, sock, stop_timeout=stop_timeout)
        await self.http_server.start()
        if metrics.enabled():
            self._recount = asyncio.get_running_loop().create_task(self._count_accounts())

    async def _count_accounts(self) -> None:
        """The accounts gauge: counted now and every ACCOUNTS_RECOUNT seconds
        (removals by expiry or admin), one more at each creation meanwhile."""
        while True:
            try:
                count = await asyncio.to_thread(self.auth.store.count)
                metrics.ACCOUNTS.set(count)
            except OSError as e:
                self.log.warning("cannot count the accounts: %s", e)
            await asyncio.sleep(ACCOUNTS_RECOUNT)

    async def stop(self) -> None:
        if self._recount is not None:
            self._recount.cancel()
        self.hashers.shutdown(wait=False)
        self.writers.shutdown(wait=False)
        if self.http_server is not None:
            await self.http_server.stop()
            self.http_server.sock.close()
        if self._http_file is not None:
            self._http_file.remove()

    def endpoint(self) -> Endpoint:
        # Dovecot asks from its auth-worker process, which runs as vmail like we do
        # (service auth-worker in dovecot.conf): nobody else may list accounts,
        # read hashes or create accounts here
        return Endpoint.unix(self.config.doveauth_socket)

    # ------------------------------------------------------------ lookups (both protocols)

    async def passdb(self, username: str, password: str) -> dict[str, str] | None:
        """An existing, enabled account's fields, else whatever creation decides."""
        answer = self.auth.existing(username)
        if answer is None:
            return None
        if answer is not NO_ACCOUNT:
            return await self._verified(username, password, answer)
        if self.auth.creation_refused(username, password):
            return None
        loop = asyncio.get_running_loop()
        stored = await loop.run_in_executor(self.hashers, hash_password, password)
        answer = await loop.run_in_executor(self.writers, self.auth.create, username, stored)
        if answer is None or answer["password"] != stored:
            return answer  # a concurrent first login made it, with its own password
        # made with this password just now (its salt is new): no need to hash it again
        self.verified.add(username, stored, password)
        return {**answer, "password": PLAIN_SCHEME + password}

    async def _verified(
        self, username: str, password: str, answer: dict[str, str]
    ) -> dict[str, str]:
        """An existing account's passdb fields: with the password in Dovecot's PLAIN
        scheme once it has been verified here (chatmaild.dictd.verified), else with
        the stored hash, which Dovecot compares, refuses and logs as a mismatch."""
        stored = answer["password"]
        if not self.verified.known(username, stored, password):
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(self.hashers, verify_password, password, stored):
                return answer
            self.verified.add(username, stored, password)
        return {**answer, "password": PLAIN_SCHEME + password}

    def userdb(self, username: str) -> dict[str, str] | None:
        return self.auth.userdb(username)

    async def all_users(self) -> list[str]:
        # one stat per account (only complete accounts are listed): off the event loop
        return await asyncio.to_thread(list, self.auth.store.iter_addresses())

    # ------------------------------------------------------------ dict protocol

    async def lookup(self, key: str, user: str | None) -> str | None:
        namespace, _, rest = key.partition("/")
        kind, _, rest = rest.partition("/")
        if namespace != "shared" or kind not in ("passdb", "userdb"):
            raise ProtocolError(f"unsupported key {key[:80]!r}")
        fields = split_escaped_key(rest)
        if kind == "userdb":
            answer = self.userdb(fields[0])
        else:
            if len(fields) != 2:
                raise ProtocolError('passdb key needs <password>"<user>')
            password, username = fields
            answer = await self.passdb(username, password)
        return json.dumps(answer) if answer is not None else None

    async def iterate(self, flags, max_rows, paths, user):
        if paths and paths[0].rstrip("/") == "shared/userdb":
            return [(f"shared/userdb/{addr}", "") for addr in await self.all_users()]
        return []


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "lookup" in args:  # `doveauth [-c INI] lookup ADDR`: the operator tool, not the daemon
        from chatmaild.admin.main import main as admin_main

        i = args.index("lookup")
        return admin_main([*args[:i], "doveauth", *args[i:]])
    return run_daemon(DoveauthDaemon, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
