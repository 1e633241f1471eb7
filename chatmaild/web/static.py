"""An operator's own static site (``www_folder``): which file a URL path names.

:func:`lookup` maps a decoded URL path to a regular file below the folder, or
to a redirect (a directory named without its trailing slash), or to nothing.
Refused, as if missing: ``..`` and ``.`` segments, NUL and backslash, hidden
names (``.git``, ``.htpasswd``; only ``.well-known`` is served), anything whose
real path (all symlinks resolved) leaves the folder, and anything that is not a
regular file (devices, FIFOs, sockets).  Symlinks that stay inside are followed.
:func:`open_file` opens the found file without following a symlink put in its
place since, and checks again that it is a regular file.

Directories serve their ``index.html``; there are no listings.
"""

from __future__ import annotations

import mimetypes
import os
import stat
import urllib.parse
from dataclasses import dataclass

INDEX = "index.html"
NOT_FOUND_PAGE = "404.html"
ALLOWED_HIDDEN = frozenset({".well-known"})


@dataclass(frozen=True)
class Found:
    path: str  # real path of a regular file inside the folder


@dataclass(frozen=True)
class Redirect:
    location: str  # the same path with a trailing slash, rebuilt from checked segments


def url_segments(url_path: str) -> list[str] | None:
    """The names in a decoded URL path, or None if it may not name a file of the site."""
    if not url_path.startswith("/"):
        return None
    segments = [s for s in url_path.split("/") if s]
    for s in segments:
        if s in (".", "..") or "\0" in s or "\\" in s:
            return None
        if s.startswith(".") and s not in ALLOWED_HIDDEN:
            return None
    return segments


def is_inside(root: str, path: str) -> bool:
    """Whether real path ``path`` is ``root`` or below it (both already resolved)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _regular_inside(root: str, path: str) -> str | None:
    real = os.path.realpath(path)
    if not is_inside(root, real):
        return None
    try:
        st = os.stat(real)
    except OSError:
        return None
    return real if stat.S_ISREG(st.st_mode) else None


def lookup(root: str, url_path: str) -> Found | Redirect | None:
    """What ``url_path`` names below ``root``; None: answer 404."""
    segments = url_segments(url_path)
    if segments is None:
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *segments))
    if not is_inside(real_root, real):
        return None
    try:
        st = os.stat(real)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        if not url_path.endswith("/"):
            # relative links in index.html need the slash; the location is built
            # from checked segments, so "//other.host" cannot become an open redirect
            quoted = "/".join(urllib.parse.quote(s) for s in segments)
            return Redirect(f"/{quoted}/" if quoted else "/")
        found = _regular_inside(real_root, os.path.join(real, INDEX))
        return Found(found) if found else None
    return Found(real) if stat.S_ISREG(st.st_mode) else None


def not_found_page(root: str) -> Found | None:
    """The site's own ``404.html``, if it has one."""
    found = _regular_inside(os.path.realpath(root), os.path.join(root, NOT_FOUND_PAGE))
    return Found(found) if found else None


def open_file(found: Found) -> tuple[int, os.stat_result] | None:
    """An open descriptor of the file and its stat, or None if it is gone, unreadable
    or no longer a regular file.  O_NONBLOCK: a FIFO swapped in cannot block the open."""
    try:
        fd = os.open(found.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def content_type(path: str) -> str:
    kind, encoding = mimetypes.guess_type(path, strict=False)
    if kind is None or encoding is not None:
        # unknown, or a compressed file (.gz) that must not be sent as its inner type
        return "application/octet-stream"
    return kind
