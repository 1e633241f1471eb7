"""chatmail-lastlogin driven over its socket with the lines Dovecot's last_login plugin sends."""

from __future__ import annotations

import os

import pytest

from chatmaild.common.accounts import AccountStore
from chatmaild.common.config import read_config
from chatmaild.dictd.lastlogin import parse_timestamp
from tests.fixtures.metadata import DOMAIN

USER = f"erin12345@{DOMAIN}"
KEY = f"shared/last-login/{USER}"


@pytest.fixture
def account(metadata_ini):
    store = AccountStore(read_config(metadata_ini.path))
    return store.create(USER, "a-long-enough-password").account


@pytest.mark.parametrize(("sent", "day"), [(100000, 86400), (200000, 172800)])
def test_login_is_recorded_as_day(lastlogin_daemon, account, sent, day):
    with lastlogin_daemon.client() as c:
        assert c.set(USER, KEY, str(sent)).startswith("O")
    st = account.password_path.stat()
    assert (int(st.st_mtime), int(st.st_atime)) == (day, day)
    assert account.last_login() == day


def test_same_day_does_not_touch_the_file(lastlogin_daemon, account):
    with lastlogin_daemon.client() as c:
        assert c.set(USER, KEY, "1700006500").startswith("O")  # day 1700006400
        ctime = account.password_path.stat().st_ctime_ns
        # later the same UTC day: nothing is written (ctime would move on utime)
        assert c.set(USER, KEY, "1700090000").startswith("O")
        assert account.password_path.stat().st_ctime_ns == ctime
        assert c.set(USER, KEY, "1700100000").startswith("O")  # next day
    assert account.last_login() == 1700100000 // 86400 * 86400


def test_bad_requests_fail(lastlogin_daemon, account):
    before = account.last_login()
    with lastlogin_daemon.client() as c:
        assert c.set(USER, f"shared/last-login/nobody123@{DOMAIN}", "100000").startswith("F")
        assert c.set(USER, "shared/last-login/x@other.org", "100000").startswith("F")
        assert c.set(USER, f"shared/other/{USER}", "100000").startswith("F")
        assert c.set(USER, KEY, "yesterday").startswith("F")
        assert c.transaction(USER, [("unset", KEY, None)]).startswith("F")
        assert c.lookup(KEY, USER) == "N"
    assert account.last_login() == before
    assert "no password file" in lastlogin_daemon.log()


def test_parse_timestamp():
    assert parse_timestamp("1700000000") == 1700000000
    assert parse_timestamp(" 1700000000.5 ") == 1700000000
    assert parse_timestamp("1700000000123") == 1700000000  # last_login_precision = ms
    for bad in ("-5", "", "x"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_daemon_survives_garbage(lastlogin_daemon, account):
    with lastlogin_daemon.client() as c:
        assert c.request("C999").startswith("F")
        assert c.request("Xjunk").startswith("F")
        assert c.set(USER, KEY, "100000").startswith("O")
    assert lastlogin_daemon.proc is not None and lastlogin_daemon.proc.poll() is None
    assert os.path.exists(account.password_path)
