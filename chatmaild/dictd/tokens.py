"""Push device tokens per account, in ``<mailboxes_dir>/<addr>/metadata.json``.

The file is the reference relay's format: a JSON object whose ``devicetoken``
member maps each token to the unix time it was last set.  Older relays stored a
plain list of tokens; such a list is converted on the next read or write with
every token stamped "now".  A token stays valid while it was set within the
last 90 days (and not more than a minute in the future, which only a broken
clock produces); invalid ones are purged whenever the file is rewritten.

Writes take ``metadata.json.lock`` (filelock) and replace the file atomically,
so concurrent writers never lose each other's tokens and readers never see half
a file.  A corrupt file reads as empty with a warning: the account loses its
tokens (the client sets them again on its next login), the daemon keeps going.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import filelock

from chatmaild.common.accounts import DAY, LOCK_TIMEOUT, Account, AccountStore, atomic_write
from chatmaild.common.config import Config

METADATA_FILE = "metadata.json"
TOKEN_LIFETIME = 90 * DAY
FUTURE_SLACK = 60  # seconds a timestamp may lie ahead of our clock
MAX_TOKEN_LENGTH = 4096
# A device registers one token; a cap keeps one account from making the
# notifier POST thousands of times per message.  The oldest-set token goes first.
MAX_TOKENS = 32

log = logging.getLogger("chatmaild.dictd.tokens")


class TokenError(ValueError):
    """A token value that cannot be stored (empty, too long, or with whitespace)."""


def check_token(token: str) -> str:
    if not token:
        raise TokenError("empty device token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError(f"device token longer than {MAX_TOKEN_LENGTH} characters")
    # read back as one space-separated list, so a token must be one word
    if any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in token):
        raise TokenError("device token contains whitespace or control characters")
    return token


def normalize(data: dict, now: float) -> tuple[dict[str, float], bool]:
    """The valid ``{token: ts}`` of a file's content, and whether the file needs rewriting.

    Pure: converts the legacy list format and drops expired, future-dated and
    malformed entries.
    """
    raw = data.get("devicetoken")
    changed = False
    if raw is None:
        return {}, False
    if isinstance(raw, list):  # legacy format (reference 1.1-1.6)
        raw = {t: now for t in raw if isinstance(t, str)}
        changed = True
    if not isinstance(raw, dict):
        return {}, True
    valid: dict[str, float] = {}
    for token, ts in raw.items():
        if (
            isinstance(token, str)
            and isinstance(ts, (int, float))
            and not isinstance(ts, bool)
            and now - TOKEN_LIFETIME < ts < now + FUTURE_SLACK
        ):
            valid[token] = ts
        else:
            changed = True
    return valid, changed


class TokenStore:
    """Device tokens of every account; all methods are blocking file I/O."""

    def __init__(
        self,
        config: Config,
        accounts: AccountStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.accounts = accounts or AccountStore.shared(config)
        self.clock = clock

    def _path(self, account: Account) -> Path:
        return account.home / METADATA_FILE

    def _read(self, path: Path) -> dict:
        try:
            text = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        try:
            data = json.loads(text)
        except ValueError as e:
            log.warning("%s is corrupt, reading it as empty: %s", path, e)
            return {}
        if not isinstance(data, dict):
            log.warning("%s is corrupt, reading it as empty: not a JSON object", path)
            return {}
        return data

    def tokens(self, addr: str) -> list[str]:
        """Valid tokens in the order they were first set; rewrites the file if it needed it.

        Raises AddressError for an address outside the mail domain.
        """
        account = self.accounts.account(addr)
        valid, changed = normalize(self._read(self._path(account)), self.clock())
        if changed:
            valid = self._modify(account, lambda tokens: False)
        return list(valid)

    def add(self, addr: str, token: str) -> None:
        """Store a token, or refresh its timestamp if it is known."""
        check_token(token)
        account = self.accounts.account(addr)
        now = self.clock()

        def update(tokens: dict[str, float]) -> bool:
            tokens[token] = now
            while len(tokens) > MAX_TOKENS:
                oldest = min(tokens, key=tokens.__getitem__)
                log.info("%s has more than %d device tokens; dropping the oldest", addr, MAX_TOKENS)
                del tokens[oldest]
            return True

        self._modify(account, update)

    def remove(self, addr: str, token: str) -> bool:
        """Forget a token (the push service said it is gone); False if it was not there."""
        account = self.accounts.account(addr)
        removed = False

        def update(tokens: dict[str, float]) -> bool:
            nonlocal removed
            removed = tokens.pop(token, None) is not None
            return removed

        self._modify(account, update)
        return removed

    def _modify(
        self, account: Account, update: Callable[[dict[str, float]], bool]
    ) -> dict[str, float]:
        path = self._path(account)
        account.home.mkdir(mode=0o700, exist_ok=True)
        with filelock.FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT):
            data = self._read(path)
            tokens, changed = normalize(data, self.clock())
            if update(tokens) or changed:
                data["devicetoken"] = tokens
                atomic_write(path, json.dumps(data, separators=(",", ":")).encode())
        return tokens
