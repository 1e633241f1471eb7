"""Account store on the filesystem, shared by every daemon and tool.

Layout (compatible with the reference relay)::

    <mailboxes_dir>/<addr>/password             {SHA512-CRYPT}$6$...; mtime = last login (day)
    <mailboxes_dir>/<addr>/enforceE2EEincoming  flag: refuse incoming cleartext
    <mailboxes_dir>/<addr>/DISABLED             flag: account disabled
    <mailboxes_dir>/<addr>/{cur,new,tmp,...}    Maildir, written by Dovecot

Every path is built from a canonical address (see :mod:`chatmaild.common.addr`), so no
input can name a file outside ``mailboxes_dir``.  Writes are atomic (temp file,
rename) and durable before anyone is answered (fsync of file and directory);
creation is serialised per address with a lock on the
account directory (flock: no lock file) and re-checked under it.  An account
is a directory with a non-empty password file; what a killed creation leaves
behind is not listed and is completed by the next creation (see
:mod:`chatmaild.common.accountlock`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chatmaild.common import accountlock
from chatmaild.common.accountlock import FLAG_ENFORCE_E2EE
from chatmaild.common.addr import AddressError, canonical_address, check_creatable, is_safe_dirname
from chatmaild.common.config import Config

HASH_PREFIX = "{SHA512-CRYPT}"
PASSWORD = "password"
FLAG_DISABLED = "DISABLED"
DAY = 86400
LOCK_TIMEOUT = 10.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

log = logging.getLogger("chatmaild.common.accounts")


def hash_password(password: str) -> str:
    # imported here: filtermail reads accounts but hashes nothing (ctypes: 0.5 MB)
    from chatmaild.common import shacrypt

    return HASH_PREFIX + shacrypt.sha512_crypt(password)


def verify_password(password: str, stored: str) -> bool:
    """Check a cleartext password against a stored ``{SHA512-CRYPT}`` hash."""
    if not stored.startswith(HASH_PREFIX):
        return False
    from chatmaild.common import shacrypt

    crypted = stored[len(HASH_PREFIX) :]
    candidate = shacrypt.crypt(password, crypted)
    return candidate is not None and hmac.compare_digest(candidate, crypted)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half.

    The data is on disk before the rename, so even a power loss leaves the old file
    or the new one (two journal commits: one for the data, one for the rename).
    """
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_missing():
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_new_file(dir_fd: int, name: str, data: bytes, mode: int = 0o600) -> os.stat_result:
    """Put ``data`` under ``name`` in ``dir_fd`` whole (temp file, rename), then make it durable.

    Only for a name whose absence is harmless (a new account's password): the
    rename comes before the fsyncs, so one journal commit carries data, inode and
    name, and the directory's fsync finds nothing left to do.  A power loss
    before they return can leave the file empty (the creation never answered);
    readers treat an empty file as absent.  Returns the file's stat.
    """
    tmp = f"{name}.tmp-{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with _suppress_missing():
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(fd)
        os.fsync(dir_fd)
        return os.fstat(fd)
    finally:
        os.close(fd)


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        return isinstance(exc, FileNotFoundError)


def touch_flag(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.close(fd)


@dataclass(frozen=True)
class Account:
    """One account's directory; built only from a canonical address."""

    addr: str
    home: Path
    # plain-string paths for the lookup hot path (pathlib costs microseconds per join)
    _password_file: str = field(init=False, repr=False, compare=False)
    # (inode, mtime_ns, size) of the password file last read, and its text
    _read_cache: tuple[tuple[int, int, int], str] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_password_file", os.path.join(self.home, PASSWORD))

    @property
    def password_path(self) -> Path:
        return self.home / PASSWORD

    def password_hash(self) -> str | None:
        """The stored hash, or None when there is no (or an empty) password file.

        One stat() answers repeated lookups: the text is re-read whenever the
        file's identity changes (every write replaces it with a new inode).
        """
        try:
            st = os.stat(self._password_file)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._read_cache
            if cached is not None and cached[0] == key:
                return cached[1]
            with open(self._password_file, "rb") as fp:
                data = fp.read(4096)
        except (FileNotFoundError, NotADirectoryError):
            return None
        text = data.decode("ascii", "replace").strip()
        if not text:
            log.error("empty password file for %s", self.addr)
            return None
        # a file replaced between stat and read is cached under the old key: re-read next time
        object.__setattr__(self, "_read_cache", (key, text))
        return text

    def remember_password(self, st: os.stat_result, text: str) -> None:
        """Cache what was just written (``st``: the file's stat), sparing the next read."""
        object.__setattr__(self, "_read_cache", ((st.st_ino, st.st_mtime_ns, st.st_size), text))

    @property
    def exists(self) -> bool:
        return self.password_hash() is not None

    def last_login(self) -> int | None:
        try:
            return int(self.password_path.stat().st_mtime)
        except FileNotFoundError:
            return None

    def set_last_login(self, timestamp: float) -> bool:
        """Record a login at day granularity; touch the disk only when the day changes."""
        day = int(timestamp) // DAY * DAY
        try:
            st = self.password_path.stat()
        except FileNotFoundError:
            log.error("last login for %s: no password file", self.addr)
            return False
        if int(st.st_mtime) == day and int(st.st_atime) == day:
            return False
        os.utime(self.password_path, (day, day))
        return True

    def _flag(self, name: str) -> Path:
        return self.home / name

    @property
    def is_disabled(self) -> bool:
        return os.path.exists(os.path.join(self.home, FLAG_DISABLED))

    @property
    def enforces_e2ee_incoming(self) -> bool:
        return self._flag(FLAG_ENFORCE_E2EE).exists()

    def set_flag(self, name: str, on: bool) -> None:
        path = self._flag(name)
        if on:
            touch_flag(path)
        else:
            with _suppress_missing():
                path.unlink()


def _is_same_dir(path: Path, dir_fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(dir_fd))
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class CreateResult:
    account: Account | None
    created: bool
    refused: str | None = None  # why creation was refused


def drop_privileges(user: str, *, temporary: bool = False) -> Callable[[], None]:
    """Become ``user`` (the store owner, vmail) when running as root; else do nothing.

    With ``temporary`` only the effective ids change and the returned function
    switches back to root (for the checkpassword program, whose reply program
    must run with the real uid Dovecot started it with).  Raises LookupError if
    the user does not exist.
    """
    if os.geteuid() != 0:
        return lambda: None
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise LookupError(f"user {user!r} does not exist") from None
    if pw.pw_uid == 0:
        return lambda: None
    groups = os.getgroups()
    os.setgroups([])
    if not temporary:
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        return lambda: None
    egid = os.getegid()
    os.setegid(pw.pw_gid)
    os.seteuid(pw.pw_uid)

    def restore() -> None:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)

    return restore


ACCOUNT_CACHE_SIZE = 4096  # accounts whose objects a store keeps
_SHARED: dict[tuple[str, str], AccountStore] = {}
_SHARED_LOCK = threading.Lock()


class AccountStore:
    """Accounts below ``config.mailboxes_dir``."""

    def __init__(self, config: Config, lock_timeout: float = LOCK_TIMEOUT) -> None:
        self.config = config
        self.root = Path(config.mailboxes_dir)
        self.lock_timeout = lock_timeout
        # Account objects are immutable: remember recent ones, lookups repeat a lot
        self._accounts = functools.lru_cache(maxsize=ACCOUNT_CACHE_SIZE)(self._make_account)

    @classmethod
    def shared(cls, config: Config) -> AccountStore:
        """The one store of this process for ``config``'s mailboxes: the dict roles
        share it, so an account's object (and its cache entry, about 1 KB) exists
        once, not once per role."""
        key = (config.mailboxes_dir, config.mail_domain)
        with _SHARED_LOCK:
            store = _SHARED.get(key)
            if store is None:
                store = _SHARED[key] = cls(config)
            return store

    # -- addressing

    def account(self, raw_addr: str) -> Account:
        """The Account for an address; raises AddressError for anything unsafe."""
        return self._accounts(raw_addr)

    def _make_account(self, raw_addr: str) -> Account:
        addr = canonical_address(raw_addr, self.config.mail_domain)
        home = self.root / addr
        # belt and braces: the validated name is one plain path component
        if home.parent != self.root or home.name != addr:
            raise AddressError(f"{addr!r} is not a plain directory name")
        return Account(addr, home)

    def lookup(self, raw_addr: str) -> Account | None:
        try:
            account = self.account(raw_addr)
        except AddressError:
            return None
        return account if account.exists else None

    # -- registration

    @property
    def registration_blocked(self) -> bool:
        return os.path.exists(self.config.nocreate_file)

    def set_registration_blocked(self, blocked: bool) -> None:
        path = Path(self.config.nocreate_file)
        if blocked:
            path.parent.mkdir(parents=True, exist_ok=True)
            touch_flag(path)
        else:
            with _suppress_missing():
                path.unlink()

    def creation_refusal(self, raw_addr: str, password: str) -> str | None:
        """Why an account for this address/password may not be created, or None."""
        if self.registration_blocked:
            return f"registration blocked by {self.config.nocreate_file}"
        if len(password) < self.config.password_min_length:
            return f"password shorter than {self.config.password_min_length} characters"
        try:
            addr = canonical_address(raw_addr, self.config.mail_domain)
            check_creatable(addr, self.config.username_min_length, self.config.username_max_length)
        except AddressError as e:
            return f"invalid address: {e}"
        return None

    def create(
        self,
        raw_addr: str,
        password: str,
        *,
        password_is_hash: bool = False,
        enforce_e2ee: bool = True,
    ) -> CreateResult:
        """Create the account unless it exists (then return it unchanged).

        Callers check :meth:`creation_refusal` (and system limits) first; this
        method only re-validates the address.  Concurrent calls for one address
        produce exactly one password file.  ``enforce_e2ee=False`` (migrated old
        accounts) leaves out the enforceE2EEincoming flag.
        """
        account = self.account(raw_addr)
        existing = account.password_hash()
        if existing is not None:
            return CreateResult(account, created=False)
        with self._locked(account) as dir_fd:
            if account.password_hash() is not None:
                return CreateResult(account, created=False)
            # under the lock: of many first logins of one address, only the winner hashes
            stored = password if password_is_hash else hash_password(password)
            if enforce_e2ee:
                touch_flag(account.home / FLAG_ENFORCE_E2EE)
            data = stored.encode("ascii")
            st = publish_new_file(dir_fd, PASSWORD, data)
            account.remember_password(st, stored)
        return CreateResult(account, created=True)

    def set_password(self, raw_addr: str, password: str) -> Account:
        account = self.account(raw_addr)
        with self._locked(account):
            mtime = account.last_login()
            atomic_write(account.password_path, hash_password(password).encode("ascii"))
            if mtime is not None:  # a password change is not a login
                os.utime(account.password_path, (mtime, mtime))
        return account

    @contextlib.contextmanager
    def _locked(self, account: Account) -> Iterator[int]:
        """Hold the account's lock, its directory created if needed, stale temp files gone;
        yields a descriptor of the directory.

        The directory may vanish while we wait (chatmail-expire removes a
        creation leftover under this lock): then it is made again and locked anew.
        """
        deadline = time.monotonic() + self.lock_timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, f"cannot lock {account.home}")
            account.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                dir_fd = os.open(account.home, _DIR_FLAGS)
            except FileNotFoundError:
                continue  # removed between mkdir and open
            try:  # closing dir_fd releases the lock
                accountlock.acquire(dir_fd, max(deadline - time.monotonic(), 0.001))
                if not _is_same_dir(account.home, dir_fd):
                    continue  # removed or renamed away while we waited for the lock
                for name in accountlock.remove_password_temps(dir_fd):
                    log.warning("%s: removed stale %s", account.addr, name)
                yield dir_fd
                return
            finally:
                os.close(dir_fd)

    def delete(self, raw_addr: str) -> bool:
        account = self.account(raw_addr)
        if not account.home.is_dir() or account.home.is_symlink():
            return False
        # rename first so Dovecot/doveauth never see a half-deleted account
        trash = self.root / f".deleting-{secrets.token_hex(6)}"
        try:
            os.rename(account.home, trash)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return True

    # -- listing

    def count(self) -> int:
        """How many accounts there are (as iter_addresses lists them)."""
        return sum(1 for _ in self.iter_addresses())

    def iter_addresses(self) -> Iterator[str]:
        """Every account (sorted): a real directory with a non-empty password file.

        A directory an interrupted creation left behind is no account yet.
        """
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        names = sorted(
            e.name for e in entries if is_safe_dirname(e.name) and e.is_dir(follow_symlinks=False)
        )
        root = str(self.root)
        for name in names:
            try:
                st = os.stat(os.path.join(root, name, PASSWORD), follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                yield name
