"""The certificate the relay serves: ``cert.pem`` and ``key.pem`` of one directory,
switched to a new pair in one step.

Postfix, Dovecot and the web process read ``<tls>/cert.pem`` and ``<tls>/key.pem``.
Two renames (certificate, then key) would leave a moment in which a starting
``smtpd`` reads a new certificate with the old key.  So both names are symlinks
into ``current``, itself a symlink to one directory per certificate, and a
renewal writes a new directory and turns ``current`` with one rename(2).  The
first time, the self-signed pair that setup made is kept in ``self-signed/``.
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

CURRENT = "current"
SELF_SIGNED = "self-signed"
FILES = ("cert.pem", "key.pem")


def _point(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _adopt(tls_dir: Path) -> None:
    """Turn plain cert.pem/key.pem into links through ``current`` (same content)."""
    if all((tls_dir / name).is_symlink() for name in FILES):
        return
    keep = tls_dir / SELF_SIGNED
    keep.mkdir(exist_ok=True)
    os.chmod(keep, 0o755)
    for name in FILES:
        src = tls_dir / name
        if src.exists() and not src.is_symlink():
            shutil.copy2(src, keep / name)
            st = src.stat()
            os.chown(keep / name, st.st_uid, st.st_gid)
    if not (tls_dir / CURRENT).exists():
        _point(tls_dir / CURRENT, SELF_SIGNED)
    for name in FILES:
        _point(tls_dir / name, f"{CURRENT}/{name}")


def served(tls_dir: Path) -> Path:
    """The directory whose pair is served now."""
    return (tls_dir / CURRENT).resolve() if (tls_dir / CURRENT).exists() else tls_dir


def install(tls_dir: Path, fullchain: bytes, key: bytes, key_gid: int | None) -> Path:
    """Serve ``fullchain`` and ``key`` from now on; the previous pair stays as a fallback."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%f")
    new = tls_dir / f"acme-{stamp}"
    new.mkdir()
    # modes set explicitly: the unit's umask (0077) would hide them from the web
    # process, which reads the pair as vmail
    os.chmod(new, 0o755)
    fd = os.open(new / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if key_gid is not None:
        os.fchown(fd, 0, key_gid)
    os.fchmod(fd, 0o640)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    (new / "cert.pem").write_bytes(fullchain)
    os.chmod(new / "cert.pem", 0o644)
    for path in (new / "cert.pem", new / "key.pem", new):
        _fsync(path)
    _adopt(tls_dir)
    previous = served(tls_dir).name
    _point(tls_dir / CURRENT, new.name)
    _fsync(tls_dir)
    _prune(tls_dir, keep={new.name, previous, SELF_SIGNED})
    return new


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(tls_dir: Path, keep: set[str]) -> None:
    for d in tls_dir.glob("acme-*"):
        if d.is_dir() and not d.is_symlink() and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
