"""One-pass, symlink-proof scanning of the mailbox tree, shared by the storage tools.

``chatmail-expire``, ``chatmail-quota-expire`` and ``chatmail-fsreport`` all look
at ``<mailboxes_dir>/<addr>/`` the same way:

- every directory is opened relative to its parent with ``O_NOFOLLOW`` and
  listed once with ``os.scandir``; symlinks are counted, never followed;
- a *message* is a regular file whose directory is named ``cur``, ``new`` or
  ``tmp`` (the INBOX and any IMAP subfolder such as ``.DeltaChat/cur``);
- everything else (``dovecot*`` indexes, ``maildirsize``, ``metadata.json``,
  flag files, ...) is an *extra* file;
- the last login is the mtime of the top-level ``password`` file (the
  lastlogin daemon keeps it at day granularity).

Removal goes through the same directory-fd chain (``unlinkat`` below a chain
of ``O_NOFOLLOW`` opens from ``mailboxes_dir``), so nothing outside
``mailboxes_dir`` can be reached even if a directory is swapped for a symlink
while we work.  Whole accounts are renamed to ``.deleting-<random>`` first and
then deleted, so a crash leaves either the intact account or a trash directory
that the next run finishes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chatmaild.common.accountlock import is_creation_leftover, is_password_temp
from chatmaild.common.addr import is_safe_dirname

DAY = 86400
MESSAGE_DIRS = frozenset({"cur", "new", "tmp"})
PASSWORD = "password"
MAILDIRSIZE = "maildirsize"
# same prefix as AccountStore.delete, so either tool finishes the other's crashed removal
TRASH_PREFIX = ".deleting-"
MAX_DEPTH = 32  # far deeper than any Maildir++ layout; stops pathological trees

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# ---------------------------------------------------------------- file names


def parse_maildir_name(name: str) -> tuple[int | None, int | None]:
    """``(delivery timestamp, S= size)`` of a Dovecot maildir file name.

    Names look like ``1700000000.M5P7.host,S=1234,W=1260:2,S``; either value is
    None when the name does not carry it (files written by other programs).
    """
    base = name.partition(":")[0]
    head, _, rest = base.partition(".")
    ts = int(head) if head.isascii() and head.isdigit() else None
    size = None
    pos = rest.find(",S=")
    if pos >= 0:
        digits = rest[pos + 3 :].partition(",")[0]
        if digits.isascii() and digits.isdigit():
            size = int(digits)
    return ts, size


# ---------------------------------------------------------------- scan results


@dataclass(slots=True)
class Message:
    """One message file; ``folder`` is the directory path below the mailbox."""

    folder: tuple[str, ...]  # e.g. ("cur",) or (".DeltaChat", "new"); shared per directory
    name: str
    mtime: float
    size: int  # the S= size Dovecot's quota counts, else the file size
    disk_size: int  # bytes on disk (compressed when zlib_save is on)
    ts: float  # delivery time from the name, else mtime

    @property
    def kind(self) -> str:
        """``cur``, ``new`` or ``tmp``."""
        return self.folder[-1]

    @property
    def relpath(self) -> str:
        return "/".join((*self.folder, self.name))


@dataclass(slots=True)
class MailboxScan:
    """Everything the storage tools need to know about one ``<mailboxes_dir>/<name>``."""

    name: str
    dir_mtime: float
    # mtime of a non-empty regular ``password`` file: the last login
    password_mtime: float | None = None
    # a non-empty ``password`` file, or an odd ``password`` entry (symlink, directory)
    # that gives no login time but means "not a stray directory".  An empty file is
    # no password: doveauth treats it as "no such user" and recreates it on login.
    has_password: bool = False
    messages: list[Message] = field(default_factory=list)
    extra_files: int = 0
    extra_bytes: int = 0
    newest_mtime: float = 0.0  # newest mtime of any entry, directories included
    top_entries: int = 0  # entries directly in the mailbox directory
    # every top-level entry is something an interrupted account creation leaves
    only_creation_leftovers: bool = False
    # (name, mtime) of top-level password.tmp-* files (left by an interrupted write)
    password_temps: list[tuple[str, float]] = field(default_factory=list)
    symlinks: int = 0
    errors: int = 0

    @property
    def is_empty(self) -> bool:
        return self.top_entries == 0


# ---------------------------------------------------------------- scanning


def open_root(mailboxes_dir: str | os.PathLike) -> int:
    """A directory fd for ``mailboxes_dir`` (configured by the admin, so it may be a symlink)."""
    return os.open(mailboxes_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def list_root(root_fd: int) -> tuple[list[str], list[str], int]:
    """``(account names, leftover trash names, skipped symlinks)`` in ``mailboxes_dir``, sorted.

    Only real directories count; a symlink that looks like an account is skipped
    (and reported) because its target is outside our control.
    """
    accounts: list[str] = []
    trash: list[str] = []
    symlinks = 0
    with os.scandir(root_fd) as it:
        for entry in it:
            name = entry.name
            if entry.is_symlink():
                symlinks += is_safe_dirname(name)
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            if name.startswith(TRASH_PREFIX) and len(name) > len(TRASH_PREFIX):
                trash.append(name)
            elif is_safe_dirname(name):
                accounts.append(name)
    accounts.sort()
    trash.sort()
    return accounts, trash, symlinks


def _is_empty(entry: os.DirEntry) -> bool:
    try:
        return entry.stat(follow_symlinks=False).st_size == 0
    except FileNotFoundError:
        return False


def scan_mailbox(root_fd: int, name: str, *, stat_extras: bool = False) -> MailboxScan | None:
    """Scan one account directory; None if it vanished or is not a real directory.

    Messages are always stat'ed (their mtime decides expiry).  Extra files are
    stat'ed only with ``stat_extras`` or when the account has no password file
    (then the newest mtime of anything decides whether it is abandoned).
    """
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=root_fd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        st = os.fstat(fd)
        scan = MailboxScan(name=name, dir_mtime=st.st_mtime, newest_mtime=st.st_mtime)
        with os.scandir(fd) as it:
            top = list(it)
        scan.top_entries = len(top)
        scan.only_creation_leftovers = bool(top) and all(
            e.is_file(follow_symlinks=False)
            and is_creation_leftover(e.name, e.name == PASSWORD and _is_empty(e))
            for e in top
        )
        for entry in top:
            if entry.name == PASSWORD:
                if not entry.is_file(follow_symlinks=False):
                    scan.has_password = True  # odd (symlink, directory): hands off
                elif (pst := entry.stat(follow_symlinks=False)).st_size > 0:
                    scan.has_password = True
                    scan.password_mtime = pst.st_mtime
            elif is_password_temp(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                scan.password_temps.append((entry.name, mtime))
        _walk(fd, (), top, scan, stat_extras or not scan.has_password)
        return scan
    finally:
        os.close(fd)


def _walk(
    fd: int,
    folder: tuple[str, ...],
    entries: Iterable[os.DirEntry],
    scan: MailboxScan,
    stat_extras: bool,
) -> None:
    is_message_dir = bool(folder) and folder[-1] in MESSAGE_DIRS
    subdirs: list[str] = []
    messages = scan.messages
    for entry in entries:
        try:
            if entry.is_symlink():
                scan.symlinks += 1
                if stat_extras:
                    scan.newest_mtime = max(
                        scan.newest_mtime, entry.stat(follow_symlinks=False).st_mtime
                    )
                continue
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
                continue
            if is_message_dir and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                ts, size = parse_maildir_name(entry.name)
                mtime = st.st_mtime
                messages.append(
                    Message(
                        folder,
                        entry.name,
                        mtime,
                        st.st_size if size is None else size,
                        st.st_size,
                        mtime if ts is None else ts,
                    )
                )
                if mtime > scan.newest_mtime:
                    scan.newest_mtime = mtime
                continue
            scan.extra_files += 1
            if stat_extras:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    scan.extra_bytes += st.st_size
                if st.st_mtime > scan.newest_mtime:
                    scan.newest_mtime = st.st_mtime
        except FileNotFoundError:
            continue  # removed by Dovecot while we looked (e.g. new/ -> cur/ rename)
    if len(folder) >= MAX_DEPTH:
        scan.errors += len(subdirs)
        return
    for sub in subdirs:
        try:
            cfd = os.open(sub, _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno != errno.ENOENT:
                scan.errors += 1
            continue
        try:
            if stat_extras:
                scan.newest_mtime = max(scan.newest_mtime, os.fstat(cfd).st_mtime)
            with os.scandir(cfd) as it:
                _walk(cfd, (*folder, sub), it, scan, stat_extras)
        except OSError:
            scan.errors += 1
        finally:
            os.close(cfd)


def iter_mailboxes(
    root_fd: int, names: Iterable[str], *, stat_extras: bool = False
) -> Iterator[tuple[str, MailboxScan | None, OSError | None]]:
    """Scan mailboxes one at a time (memory stays bounded by the largest mailbox)."""
    for name in names:
        try:
            yield name, scan_mailbox(root_fd, name, stat_extras=stat_extras), None
        except OSError as e:
            yield name, None, e


# ---------------------------------------------------------------- removal


@contextlib.contextmanager
def open_dir(root_fd: int, parts: Iterable[str]) -> Iterator[int]:
    """Open ``root/parts...`` refusing symlinks at every step; yields the fd."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if not part or part in (".", "..") or "/" in part:
                raise OSError(errno.EINVAL, f"unsafe path component {part!r}")
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


@dataclass(slots=True)
class Unlinked:
    files: int = 0
    size: int = 0  # S= bytes
    errors: list[str] = field(default_factory=list)


def unlink_messages(root_fd: int, mailbox: str, messages: Iterable[Message]) -> Unlinked:
    """Unlink message files, carrying on past errors (each one is reported).

    A file is only ever unlinked, never truncated or rewritten, so a Dovecot
    process that has it open keeps reading the old content and merely sees it
    vanish on its next sync.  A file already gone (Dovecot renamed it to set a
    flag, or expunged it) is skipped.  A folder that is no longer a real
    directory (swapped for a symlink) is refused as a whole.
    """
    by_folder: dict[tuple[str, ...], list[Message]] = {}
    for msg in messages:
        by_folder.setdefault(msg.folder, []).append(msg)
    result = Unlinked()
    for folder, msgs in by_folder.items():
        where = "/".join((mailbox, *folder))
        try:
            with open_dir(root_fd, (mailbox, *folder)) as fd:
                for msg in msgs:
                    try:
                        os.unlink(msg.name, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        result.errors.append(f"{where}/{msg.name!r}: {e.strerror}")
                        continue
                    result.files += 1
                    result.size += msg.size
        except FileNotFoundError:
            continue
        except OSError as e:
            result.errors.append(f"{where}: {e.strerror}")
    return result


def remove_maildirsize(root_fd: int, mailbox: str) -> bool:
    """Delete the quota cache so Dovecot recounts the (now smaller) mailbox."""
    try:
        with open_dir(root_fd, (mailbox,)) as fd:
            st = os.stat(MAILDIRSIZE, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                return False  # not Dovecot's file: leave it alone
            os.unlink(MAILDIRSIZE, dir_fd=fd)
    except FileNotFoundError:
        return False
    return True


def remove_account(root_fd: int, name: str) -> bool:
    """Remove ``<root>/<name>`` whole: atomic rename to trash, then delete the trash.

    Returns False if it was gone or is no longer a real directory.
    """
    if not is_safe_dirname(name):
        raise ValueError(f"refusing to remove unsafe name {name!r}")
    try:
        st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    trash = TRASH_PREFIX + secrets.token_hex(6)
    try:
        os.rename(name, trash, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except FileNotFoundError:
        return False
    remove_trash(root_fd, trash)
    return True


def remove_trash(root_fd: int, trash: str) -> None:
    """Finish deleting a ``.deleting-*`` directory (fd-based, never follows symlinks)."""
    if not trash.startswith(TRASH_PREFIX) or "/" in trash:
        raise ValueError(f"not a trash directory name: {trash!r}")
    shutil.rmtree(trash, dir_fd=root_fd)


# ---------------------------------------------------------------- reports


def write_textfile(path: str | os.PathLike, default_name: str, text: str) -> Path:
    """Write a Prometheus textfile atomically with mode 0644; a directory gets ``default_name``.

    The temp file starts with a dot so the node exporter (which reads ``*.prom``)
    never sees a half-written file.
    """
    target = Path(path)
    if target.is_dir():
        target = target / default_name
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            os.fchmod(fd, 0o644)  # the umask may have narrowed it; the exporter must read it
            fp.write(text)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def prom_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# Dovecot writes a new dovecot-uidlist into this lock file and renames it over the
# old one; a process killed meanwhile leaves it, empty or partial, with no PID in
# it.  Dovecot tells a dead holder's lock by the PID alone, and otherwise waits
# for the lock's stale timeout (2 minutes, compiled in): every SELECT and delivery
# into that folder waits as long.  A writer fills its lock within milliseconds.
UIDLIST_LOCK = "dovecot-uidlist.lock"
LOCK_MIN_AGE = 2.0  # seconds


def _holds_pid(head: bytes) -> bool:
    """Whether a dotlock starts with ``PID:host`` (Dovecot judges those itself)."""
    pid, sep, _ = head.partition(b":")
    return bool(sep) and pid.isdigit()


def _stale_locks(mailboxes_dir: str | os.PathLike, min_age: float, remove: bool) -> list[Path]:
    """Find (and with ``remove``, unlink) stale uidlist locks through the same
    ``O_NOFOLLOW`` directory-fd chain as the other tools: dovecot.service runs this
    as root, in directories the vmail user owns."""
    now = time.time()
    found: list[Path] = []
    try:
        root_fd = open_root(mailboxes_dir)
    except FileNotFoundError:
        return found
    try:
        accounts, _, _ = list_root(root_fd)
        for account in accounts:
            try:
                with open_dir(root_fd, [account]) as home_fd, os.scandir(home_fd) as it:
                    subfolders = [e.name for e in it if e.name.startswith(".")
                                  and e.is_dir(follow_symlinks=False)]  # fmt: skip
            except OSError:
                continue
            for folder in [[account], *([account, sub] for sub in subfolders)]:
                try:
                    with open_dir(root_fd, folder) as fd:
                        if _is_stale_lock(fd, now, min_age):
                            if remove:
                                os.unlink(UIDLIST_LOCK, dir_fd=fd)
                            found.append(Path(mailboxes_dir, *folder, UIDLIST_LOCK))
                except OSError:
                    continue
    finally:
        os.close(root_fd)
    return found


def _is_stale_lock(dir_fd: int, now: float, min_age: float) -> bool:
    try:
        st = os.stat(UIDLIST_LOCK, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < min_age:
            return False
        fd = os.open(UIDLIST_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            return not _holds_pid(os.read(fd, 32))
        finally:
            os.close(fd)
    except OSError:
        return False


def stale_uidlist_locks(
    mailboxes_dir: str | os.PathLike, min_age: float = LOCK_MIN_AGE
) -> list[Path]:
    """The ``dovecot-uidlist.lock`` files of every account's folders (INBOX and its
    ``.Folder`` subfolders) that hold no PID and are at least ``min_age`` seconds old."""
    return _stale_locks(mailboxes_dir, min_age, remove=False)


def remove_stale_uidlist_locks(
    mailboxes_dir: str | os.PathLike, min_age: float = LOCK_MIN_AGE
) -> list[Path]:
    """Remove what :func:`stale_uidlist_locks` finds; returns the removed paths."""
    return _stale_locks(mailboxes_dir, min_age, remove=True)
