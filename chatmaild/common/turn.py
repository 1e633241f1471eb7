"""TURN credentials for Debian's coturn (``use-auth-secret``, the "TURN REST API").

The relay and coturn share a secret; a credential is a user name that is its
own expiry time (Unix seconds) and the password ``base64(HMAC-SHA1(secret,
user))``, which coturn recomputes, so nothing per user is stored anywhere.
The apps read ``host:port:user:password`` from the METADATA key
``/shared/vendor/deltachat/turn`` and ask again 12 hours before the expiry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_BYTES = 32
# systemd's LoadCredential= name of the secret in chatmail-dict.service
CREDENTIAL_NAME = "turn-secret"


def credentials(secret: str, now: float, ttl: int) -> tuple[str, str]:
    """(user, password) valid until ``now + ttl``."""
    user = str(int(now) + ttl)
    digest = hmac.new(secret.encode(), user.encode(), hashlib.sha1).digest()
    return user, base64.b64encode(digest).decode()


def metadata_value(host: str, port: int, user: str, password: str) -> str:
    """The ``turn`` METADATA value the core parses (an IP-only relay's bare address)."""
    return f"{host.strip('[]')}:{port}:{user}:{password}"


def read_secret(path: str) -> str | None:
    """The shared secret: systemd's credential copy when the unit has one, else
    ``path``; None when neither can be read or it is empty."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    candidates = [Path(directory) / CREDENTIAL_NAME] if directory else []
    for candidate in [*candidates, Path(path)]:
        try:
            value = candidate.read_text(encoding="ascii").strip()
        except (OSError, UnicodeError):
            continue
        if value:
            return value
    return None


def ensure_secret(path: Path, uid: int = -1, gid: int = -1, mode: int = 0o600) -> str:
    """The secret at ``path``, created (random, ``mode``) when missing."""
    existing = read_secret_file(path)
    if existing:
        return existing
    value = secrets.token_urlsafe(SECRET_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
    os.chmod(tmp, mode)
    if uid != -1 or gid != -1:
        os.chown(tmp, uid, gid)
    os.replace(tmp, path)
    return value


def read_secret_file(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeError):
        return None
