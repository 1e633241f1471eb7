"""Server METADATA keys the Delta Chat core reads, through real Dovecot IMAP GETMETADATA.

``/shared/vendor/deltachat/appversions`` (the packaged file or appversions_path)
and ``/shared/vendor/deltachat/irohrelay`` (iroh_relay; NIL by default: no iroh
relay of ours serves the domain, so none is advertised).
"""

from __future__ import annotations

import imaplib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatmaild.dictd.appversions import PACKAGED_PATH, check_appversions
from chatmaild.relay import Relay
from tests.fixtures.relay import base_components

pytestmark = [pytest.mark.dovecot]

imaplib.Commands.setdefault("GETMETADATA", ("AUTH", "SELECTED"))

APPVERSIONS = "/shared/vendor/deltachat/appversions"
IROHRELAY = "/shared/vendor/deltachat/irohrelay"


def server_metadata(relay: Relay, entry: str) -> str | None:
    """GETMETADATA "" (entry) for a fresh account; None for NIL."""
    addr, password = relay.new_credentials()
    conn = relay.imap(addr, password)
    try:
        typ, data = conn._simple_command("GETMETADATA", '""', f"({entry})")
        assert typ == "OK", data
        _, found = conn._untagged_response(typ, data, "METADATA")
    finally:
        conn.logout()
    item = found[0]
    if isinstance(item, tuple):  # ('"" (/shared/... {N}', b'value')
        return item[1].decode()
    assert item.endswith(b" NIL)"), item
    return None


def test_appversions_and_default_iroh_relay(relay):
    served = server_metadata(relay, APPVERSIONS)
    assert served is not None
    data = json.loads(served)
    check_appversions(data)
    assert data == json.loads(PACKAGED_PATH.read_text(encoding="utf-8"))
    assert server_metadata(relay, IROHRELAY) is None


@pytest.fixture
def versions_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chatmail-appversions-", dir="/tmp"))
    path.chmod(0o755)  # chatmail-metadata reads it as vmail
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_configured_file_bad_file_logged_once_and_empty_iroh_relay(relay_factory, versions_dir):
    path = versions_dir / "appversions.json"
    mine = {"clients": [{"clientId": "deltachat", "sources": [{
        "sourceId": "apk", "versionInteger": 900, "versionString": "9.0.0",
        "downloadUrl": "https://download.delta.chat/android/deltachat-9.0.0.apk"}]}]}  # fmt: skip
    path.write_text(json.dumps(mine))
    path.chmod(0o644)
    relay = relay_factory(
        {"appversions_path": path, "iroh_relay": ""},
        components=base_components(),
    )
    assert json.loads(server_metadata(relay, APPVERSIONS)) == mine
    assert server_metadata(relay, IROHRELAY) is None  # set but empty: none advertised

    path.write_text('{"clients": [')  # an operator's half-saved edit
    assert server_metadata(relay, APPVERSIONS) is None
    assert server_metadata(relay, APPVERSIONS) is None
    log = (relay.log_dir / "dict.log").read_text(errors="replace")
    assert log.count(f"appversions_path {path} is malformed: not JSON") == 1, log

    path.write_text(json.dumps(mine))  # fixed: served again without a restart
    assert json.loads(server_metadata(relay, APPVERSIONS)) == mine
    assert relay.proc_of("metadata").poll() is None
