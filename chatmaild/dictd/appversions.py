"""The app versions file served as IMAP METADATA ``/shared/vendor/deltachat/appversions``.

Delta Chat builds that update themselves (the APK outside app stores) read the
newest version and its download URL from the relay.  The file (config key
``appversions_path``; by default the one shipped in ``chatmaild/data/``) is

    {"clients": [{"clientId": str, "sources": [{"sourceId": str,
      "versionInteger": 0..2**32-1, "versionString": str, "downloadUrl": str}]}]}

with no other keys, no repeated clientId (or sourceId within a client), and
download URLs below https://github.com/deltachat/ or https://download.delta.chat/.
It is served re-serialised on one line.  A missing, unreadable or malformed
file answers "not found" and is logged once per version of the file; a
corrected file is picked up without a restart.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatmaild.common.config import APPVERSIONS_PACKAGED

PACKAGED_PATH = APPVERSIONS_PACKAGED
URL_PREFIXES = ("https://github.com/deltachat/", "https://download.delta.chat/")
MAX_VERSION_INTEGER = 2**32 - 1
MAX_FILE_SIZE = 64 * 1024  # it names a handful of builds; anything larger is a mistake

CLIENT_KEYS = {"clientId", "sources"}
SOURCE_FIELDS: dict[str, type] = {
    "sourceId": str,
    "versionInteger": int,
    "versionString": str,
    "downloadUrl": str,
}


class AppVersionsError(ValueError):
    """The file's content does not follow the schema; the message says where."""


def _exact_keys(obj: Any, keys: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise AppVersionsError(f"{where} is not an object")
    if set(obj) != keys:
        missing, extra = sorted(keys - set(obj)), sorted(set(obj) - keys)
        parts = [f"missing {', '.join(missing)}" if missing else "",
                 f"unknown {', '.join(extra)}" if extra else ""]  # fmt: skip
        raise AppVersionsError(f"{where}: {'; '.join(p for p in parts if p)}")
    return obj


def _check_source(source: Any, where: str) -> None:
    _exact_keys(source, set(SOURCE_FIELDS), where)
    for key, typ in SOURCE_FIELDS.items():
        value = source[key]
        # bool is an int to Python, never to the client
        if not isinstance(value, typ) or isinstance(value, bool):
            raise AppVersionsError(f"{where}.{key} is not a {typ.__name__}")
    if not 0 <= source["versionInteger"] <= MAX_VERSION_INTEGER:
        raise AppVersionsError(f"{where}.versionInteger is not in 0..{MAX_VERSION_INTEGER}")
    if not source["downloadUrl"].startswith(URL_PREFIXES):
        raise AppVersionsError(f"{where}.downloadUrl is not below {' or '.join(URL_PREFIXES)}")


def check_appversions(data: Any) -> None:
    """Raise AppVersionsError unless ``data`` (parsed JSON) follows the schema."""
    _exact_keys(data, {"clients"}, "top level")
    if not isinstance(data["clients"], list):
        raise AppVersionsError("clients is not a list")
    client_ids: set[str] = set()
    for i, client in enumerate(data["clients"]):
        where = f"clients[{i}]"
        _exact_keys(client, CLIENT_KEYS, where)
        if not isinstance(client["clientId"], str):
            raise AppVersionsError(f"{where}.clientId is not a string")
        if client["clientId"] in client_ids:
            raise AppVersionsError(f"{where}.clientId {client['clientId']!r} is repeated")
        client_ids.add(client["clientId"])
        if not isinstance(client["sources"], list):
            raise AppVersionsError(f"{where}.sources is not a list")
        source_ids: set[str] = set()
        for j, source in enumerate(client["sources"]):
            _check_source(source, f"{where}.sources[{j}]")
            if source["sourceId"] in source_ids:
                raise AppVersionsError(f"{where}.sources[{j}].sourceId is repeated")
            source_ids.add(source["sourceId"])


def serialize(text: str) -> str:
    """The file's text as the one-line JSON served; raises AppVersionsError."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise AppVersionsError(f"not JSON: {e}") from None
    check_appversions(data)
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True)


@dataclass
class AppVersionsFile:
    """The served value of one file, re-read when the file changes; problems logged once."""

    path: str
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("chatmail-metadata"))
    _key: tuple | None = field(default=None, init=False)
    _value: str | None = field(default=None, init=False)

    def value(self) -> str | None:
        """One-line JSON, or None when there is no usable file (or no path configured)."""
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
            key: tuple = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError as e:
            key = ("error", e.errno)
        if key != self._key:
            self._key = key
            self._value = self._load()
        return self._value

    def _load(self) -> str | None:
        try:
            with open(self.path, "rb") as fp:
                raw = fp.read(MAX_FILE_SIZE + 1)
            if len(raw) > MAX_FILE_SIZE:
                raise AppVersionsError(f"larger than {MAX_FILE_SIZE} bytes")
            return serialize(raw.decode("utf-8"))
        except OSError as e:
            self.log.error("appversions_path %s cannot be read: %s; not served", self.path, e)
        except UnicodeDecodeError:
            self.log.error("appversions_path %s is not UTF-8; not served", self.path)
        except AppVersionsError as e:
            self.log.error("appversions_path %s is malformed: %s; not served", self.path, e)
        return None


def packaged_path() -> str:
    return str(PACKAGED_PATH)


if __name__ == "__main__":  # `python -m chatmaild.dictd.appversions FILE`: check a file
    import sys

    for name in sys.argv[1:] or [packaged_path()]:
        try:
            serialize(Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, AppVersionsError) as err:
            print(f"{name}: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"{name}: ok")
