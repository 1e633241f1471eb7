"""Last-login dict for Dovecot's last_login plugin: day of the last successful IMAP login.

Dovecot's ``last_login_dict`` points here; after every *successful* IMAP login
the plugin sends

    B<id>\\t<user>   S<id>\\tshared/last-login/<addr>\\t<unix seconds>   C<id>

and the day (UTC, epoch seconds floored to 86400) becomes the mtime of the
account's password file, which chatmail-expire reads to remove inactive
accounts.  The file is touched only when the day changes, which keeps disk
writes and the information on disk minimal.  Failed logins never reach this
daemon (the plugin only runs for an authenticated session), so wrong passwords
cannot keep an account alive.

Lookups answer N; any other change fails the transaction.

FILES
    /etc/chatmail/chatmail.ini              configuration (lastlogin_socket, mailboxes_dir)
    <mailboxes_dir>/<addr>/password         its mtime is the last login day

SIGNALS
    SIGTERM, SIGINT    finish requests in flight, then exit 0
"""

from __future__ import annotations

import asyncio

from chatmaild.common import metrics
from chatmaild.common.accounts import AccountStore
from chatmaild.common.addr import AddressError
from chatmaild.common.config import Config
from chatmaild.common.service import Endpoint, run_daemon
from chatmaild.dictd.proxy import DictDaemon, Transaction

KEY_PREFIX = "shared/last-login/"


def parse_timestamp(value: object) -> int:
    """Unix seconds from the dict value; milliseconds (precision=ms) are scaled down."""
    ts = int(float(str(value).strip()))
    if ts < 0:
        raise ValueError("negative timestamp")
    if ts > 10**11:  # later than year 5138 in seconds: it is milliseconds
        ts //= 1000
    return ts


class LastLoginDaemon(DictDaemon):
    name = "chatmail-lastlogin"

    def __init__(self, config: Config, args=None) -> None:
        super().__init__(config, args)
        self.accounts = AccountStore.shared(config)

    def endpoint(self) -> Endpoint:
        return Endpoint.unix(self.config.lastlogin_socket)

    def record(self, addr: str, value: object) -> bool:
        try:
            account = self.accounts.account(addr)
            ts = parse_timestamp(value)
        except (AddressError, ValueError) as e:
            self.log.warning("last login for %r: %s", addr[:200], e)
            return False
        if account.last_login() is None:
            self.log.error("last login for %s: no password file", account.addr)
            return False
        metrics.LOGINS.inc()
        if account.set_last_login(ts):
            self.log.debug("last login of %s is now day %d", account.addr, ts // 86400)
        return True

    async def commit(self, txn: Transaction) -> bool:
        ok = True
        for change in txn.changes:
            if change.op != "set" or not change.key.startswith(KEY_PREFIX):
                self.log.warning("refusing lastlogin %s of %r", change.op, change.key[:200])
                ok = False
                continue
            addr = change.key[len(KEY_PREFIX) :]
            # a utime is cheap, but a slow disk must not stall other logins
            ok = await asyncio.to_thread(self.record, addr, change.value) and ok
        return ok


def main(argv: list[str] | None = None) -> int:
    return run_daemon(LastLoginDaemon, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
