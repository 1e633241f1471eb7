"""The appversions file: schema check, serving, logging a bad file once (pure/unit)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from chatmaild.dictd.appversions import (
    PACKAGED_PATH,
    AppVersionsError,
    AppVersionsFile,
    check_appversions,
    serialize,
)

SOURCE = {
    "sourceId": "gplay",
    "versionInteger": 7,
    "versionString": "1.0",
    "downloadUrl": "https://download.delta.chat/android/x.apk",
}


def doc(*clients) -> dict:
    return {"clients": list(clients)}


def client(cid="deltachat", *sources) -> dict:
    return {"clientId": cid, "sources": list(sources) or [dict(SOURCE)]}


def test_packaged_file_is_valid_and_served_on_one_line():
    served = serialize(PACKAGED_PATH.read_text(encoding="utf-8"))
    assert "\n" not in served and " " not in served
    data = json.loads(served)
    check_appversions(data)
    assert data["clients"][0]["clientId"] == "deltachat"


@pytest.mark.parametrize(
    "data,where",
    [
        ([], "top level is not an object"),
        ({"clients": [], "extra": 1}, "unknown extra"),
        ({"clients": {}}, "clients is not a list"),
        (doc({"clientId": "x"}), "missing sources"),
        (doc(client("a"), client("a")), "clientId 'a' is repeated"),
        (doc(client("a", SOURCE, SOURCE)), "sourceId is repeated"),
        (doc(client("a", {**SOURCE, "versionInteger": "7"})), "versionInteger is not a int"),
        (doc(client("a", {**SOURCE, "versionInteger": True})), "versionInteger is not a int"),
        (doc(client("a", {**SOURCE, "versionInteger": 2**32})), "not in 0..4294967295"),
        (doc(client("a", {**SOURCE, "downloadUrl": "https://evil.example/x.apk"})), "not below"),
        (doc(client("a", {**SOURCE, "note": "x"})), "unknown note"),
    ],
)
def test_schema_violations_name_the_place(data, where):
    with pytest.raises(AppVersionsError, match=where):
        check_appversions(data)


def test_bad_file_answers_none_logs_once_and_recovers(tmp_path, caplog):
    path = tmp_path / "appversions.json"
    served = AppVersionsFile(str(path), logging.getLogger("t"))
    with caplog.at_level(logging.ERROR, logger="t"):
        assert served.value() is None  # missing
        assert served.value() is None
        path.write_text("{not json")
        assert served.value() is None
        assert served.value() is None
        path.write_bytes(b"\xff\xfe")
        os.utime(path, ns=(1, 1))  # a new version of the file even within one mtime tick
        assert served.value() is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "cannot be read" in messages[0] and str(path) in messages[0]
    assert "is malformed: not JSON" in messages[1]
    assert "is not UTF-8" in messages[2]
    path.write_text(json.dumps(doc(client())))
    assert json.loads(served.value()) == doc(client())


def test_empty_path_is_not_served(caplog):
    with caplog.at_level(logging.ERROR):
        assert AppVersionsFile("").value() is None
    assert caplog.records == []


def test_oversized_file_is_refused(tmp_path, caplog):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(doc(client())) + " " * 70000)
    with caplog.at_level(logging.ERROR, logger="t"):
        assert AppVersionsFile(str(path), logging.getLogger("t")).value() is None
    assert "larger than" in caplog.text
