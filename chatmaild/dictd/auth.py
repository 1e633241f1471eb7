"""passdb/userdb rules, shared by doveauth's two responders (the dict one and the HTTP one).

Kept free of asyncio and any wire protocol: the responders translate, this decides.

LOG LINES
    Created address: ADDR
    registration rejected: REASON: ADDR
    login refused for disabled account ADDR
"""

from __future__ import annotations

import enum
import logging
from typing import Final, Literal

from chatmaild.common import metrics
from chatmaild.common.accounts import Account, AccountStore, hash_password
from chatmaild.common.addr import AddressError
from chatmaild.common.config import Config
from chatmaild.dictd.syslimits import resource_refusal

log = logging.getLogger("doveauth")


class _Missing(enum.Enum):
    NO_ACCOUNT = "no account"


# AuthService.existing(): nothing stored for the address yet, creation may be tried
NO_ACCOUNT: Final = _Missing.NO_ACCOUNT


class AuthService:
    """passdb/userdb answers over the account store."""

    def __init__(self, config: Config, store: AccountStore | None = None) -> None:
        self.config = config
        self.store = store or AccountStore.shared(config)

    def user_fields(self, account: Account, requested: str) -> dict[str, str]:
        """userdb fields: where the mail lives and as whom; never the password hash
        (Dovecot hands userdb fields to doveadm, LMTP and mail processes)."""
        fields = {
            "addr": account.addr,
            "home": str(account.home),
            "uid": self.config.vmail_user,
            "gid": self.config.vmail_user,
        }
        if requested != account.addr:
            fields["user"] = account.addr  # Dovecot continues with the canonical name
        return fields

    def pass_fields(self, account: Account, stored_hash: str, requested: str) -> dict[str, str]:
        """passdb fields: the userdb fields plus the hash Dovecot verifies the login with."""
        return {**self.user_fields(account, requested), "password": stored_hash}

    def userdb(self, user: str) -> dict[str, str] | None:
        """The account's userdb fields if it exists (disabled or not), else None."""
        try:
            account = self.store.account(user)
        except AddressError:
            return None
        if account.password_hash() is None:
            return None
        return self.user_fields(account, user)

    def passdb(self, user: str, password: str) -> dict[str, str] | None:
        """Answer an existing account, or create it when every rule allows.

        The password is not verified here for existing accounts: Dovecot
        compares it with the returned hash.
        """
        answer = self.existing(user)
        if answer is not NO_ACCOUNT:
            return answer
        if self.creation_refused(user, password):
            return None
        return self.create(user, hash_password(password))

    def existing(self, user: str) -> dict[str, str] | None | Literal[_Missing.NO_ACCOUNT]:
        """passdb fields of an existing account, None when it is disabled or the
        address invalid (both logged), NO_ACCOUNT when creation may be tried."""
        try:
            account = self.store.account(user)
        except AddressError as e:
            log.warning("registration rejected: invalid address: %s: %r", e, user)
            metrics.ACCOUNTS_REFUSED.labels("address").inc()
            return None
        stored = account.password_hash()
        if stored is None:
            return NO_ACCOUNT
        if account.is_disabled:
            log.info("login refused for disabled account %s", account.addr)
            return None
        return self.pass_fields(account, stored, user)

    def creation_refused(self, user: str, password: str) -> bool:
        """Whether a rule forbids creating ``user`` now (the reason is logged).

        Only reads (a flag file, the load, /proc/meminfo, statvfs): cheap enough
        for an event loop, and checked before any hashing is spent on it.
        """
        refusal = self.store.creation_refusal(user, password) or resource_refusal(self.config)
        if refusal:
            try:
                addr = self.store.account(user).addr
            except AddressError:
                addr = repr(user)
            log.warning("registration rejected: %s: %s", refusal, addr)
            metrics.ACCOUNTS_REFUSED.labels(refusal_kind(refusal)).inc()
        return refusal is not None

    def create(self, user: str, stored_hash: str) -> dict[str, str] | None:
        """Create ``user`` with a hash made by :func:`hash_password` (blocks on the disk).

        Of concurrent first logins of one address the first one creates the
        account; the others answer it as it exists, like any later login.
        """
        result = self.store.create(user, stored_hash, password_is_hash=True)
        account = result.account
        if result.created:
            log.info("Created address: %s", account.addr)
            metrics.ACCOUNTS_CREATED.inc()
            metrics.ACCOUNTS.inc()
        stored = account.password_hash()
        if stored is None:  # deleted between create and read; let the client retry
            return None
        if not result.created and account.is_disabled:
            log.info("login refused for disabled account %s", account.addr)
            return None
        return self.pass_fields(account, stored, user)


REFUSAL_KINDS = (("registration blocked", "blocked"), ("password", "password"),
                 ("invalid address", "address"), ("load average", "load"),
                 ("available memory", "memory"), ("free disk", "disk"))  # fmt: skip


def refusal_kind(refusal: str) -> str:
    """The metric label of a refusal's text (its figures would make labels without end)."""
    return next((kind for start, kind in REFUSAL_KINDS if refusal.startswith(start)), "other")
