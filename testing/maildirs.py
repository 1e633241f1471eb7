"""Generate mailbox trees for expire/fsreport tests and the benchmark.

Messages are empty files: their size lives in the Dovecot ``S=`` name field and
their age in the mtime (set with ``os.utime``), exactly what the tools read.
"""

from __future__ import annotations

import gzip
import itertools
import os
import subprocess
from pathlib import Path

DAY = 86400
_seq = itertools.count(1)


def stored_message(path: Path) -> bytes:
    """A delivered message as the client sees it: Dovecot's zlib plugin may have
    stored it zstd- (what our config writes) or gzip-compressed (older relays)."""
    data = path.read_bytes()
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True).stdout
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def maildir_name(ts: float, size: int, *, new: bool = False, flags: str = "S") -> str:
    """A Dovecot-style maildir file name: ``<ts>.M<n>P<pid>.host,S=<size>,W=<size>[:2,<flags>]``."""
    base = f"{int(ts)}.M{next(_seq)}P{os.getpid()}.testhost,S={size},W={size + size // 40}"
    return base if new else f"{base}:2,{flags}"


class TreeBuilder:
    """Builds ``<root>/<addr>/`` account directories relative to a fixed ``now``."""

    def __init__(self, root: str | os.PathLike, now: float) -> None:
        self.root = Path(root)
        self.now = now
        self.root.mkdir(parents=True, exist_ok=True)

    def ago(self, days: float) -> float:
        return self.now - days * DAY

    def account(
        self, name: str, *, login_days_ago: float | None = 0, password: bytes = b"{SHA512-CRYPT}x"
    ) -> Path:
        """An account directory; ``login_days_ago=None`` makes it password-less."""
        home = self.root / name
        for sub in ("cur", "new", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        if login_days_ago is not None:
            pw = home / "password"
            pw.write_bytes(password)
            t = self.ago(login_days_ago)
            os.utime(pw, (t, t))
        return home

    def message(
        self,
        home: Path,
        folder: str = "cur",
        *,
        days_ago: float = 0,
        size: int = 1000,
        name_days_ago: float | None = None,
        name: str | None = None,
    ) -> Path:
        """A message file in ``home/folder`` (e.g. ``cur`` or ``.DeltaChat/new``).

        The name's delivery time is ``name_days_ago`` (default: same as the mtime).
        """
        directory = home / folder
        directory.mkdir(parents=True, exist_ok=True)
        mtime = self.ago(days_ago)
        if name is None:
            name_ts = self.ago(days_ago if name_days_ago is None else name_days_ago)
            name = maildir_name(name_ts, size, new=directory.name != "cur")
        path = directory / name
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
        return path

    def extra(self, home: Path, relpath: str, data: bytes = b"x", days_ago: float = 0) -> Path:
        path = home / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        t = self.ago(days_ago)
        os.utime(path, (t, t))
        return path

    def age_dirs(self, home: Path, days_ago: float) -> None:
        """Set the mtime of ``home`` and every directory below it (after creating files)."""
        t = self.ago(days_ago)
        for dirpath, _dirs, _files in os.walk(home, topdown=False):
            os.utime(dirpath, (t, t), follow_symlinks=False)


def generate_bench_tree(
    root: str | os.PathLike,
    now: float,
    *,
    mailboxes: int = 20_000,
    messages: int = 1_000_000,
    domain: str = "bench.example",
) -> int:
    """A big, realistic-shaped tree as fast as possible (empty files, fd-relative calls).

    Per mailbox: cur/new/tmp, a ``.DeltaChat`` folder, password, maildirsize and
    dovecot index files; messages spread over 0..30 days, sizes 1 kB..2 MB, every
    50th account inactive.  Returns the number of message files created.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    per_box, extra = divmod(messages, mailboxes)
    created = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    pid = os.getpid()
    for i in range(mailboxes):
        home = root / f"u{i:08d}@{domain}"
        home.mkdir()
        for sub in ("cur", "new", "tmp", ".DeltaChat", ".DeltaChat/cur", ".DeltaChat/new"):
            (home / sub).mkdir()
        for fname in ("dovecot.index", "dovecot-uidlist", "maildirsize"):
            os.close(os.open(home / fname, flags, 0o600))
        pw_fd = os.open(home / "password", flags, 0o600)
        os.write(pw_fd, b"{SHA512-CRYPT}$6$x")
        login = now - (100 if i % 50 == 0 else i % 30) * DAY
        os.utime(pw_fd, (login, login))
        os.close(pw_fd)
        count = per_box + (1 if i < extra else 0)
        dfds = {
            d: os.open(home / d, os.O_RDONLY | os.O_DIRECTORY)
            for d in ("cur", "new", ".DeltaChat/cur")
        }
        try:
            for j in range(count):
                folder = "cur" if j % 5 else ("new" if j % 2 else ".DeltaChat/cur")
                age = ((i * 7919 + j * 104729) % 3000) / 100.0  # 0..30 days
                ts = now - age * DAY
                mix = (i * 7919 + j * 104729) * 2654435761
                # ~6% large (up to 2 MB, the attachments), the rest small chat messages
                size = 1000 + (mix % 2_000_000 if j % 17 == 0 else mix % 60_000)
                name = f"{int(ts)}.M{j}P{pid}.bench,S={size},W={size + 40}"
                if folder != "new":
                    name += ":2,S"
                fd = os.open(name, flags, 0o600, dir_fd=dfds[folder])
                os.utime(fd, (ts, ts))
                os.close(fd)
                created += 1
        finally:
            for fd in dfds.values():
                os.close(fd)
    return created
