"""``chatmaild dns --check`` against a real authoritative DNS server (Debian's dnsmasq)
serving the zone ``chatmaild dns`` prints: all ok; each record removed or changed in
turn is named, and the check fails."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from chatmaild.common.config import Config
from chatmaild.relay.dnsrecords import check, records
from testing.dnsmasq import Zone

DOMAIN = "chat.example.org"
DKIM = "v=DKIM1; k=rsa; p=" + "A" * 392  # longer than one TXT string
CONFIG = Config(mail_domain=DOMAIN, acme_email="admin@example.org")


@pytest.fixture(scope="module")
def expected():
    return records(CONFIG, DKIM)


def test_the_whole_zone_is_ok(expected):
    with Zone(DOMAIN, expected) as zone:
        findings = check(expected, zone.address)
    assert [(f.record.name, f.record.rtype, f.status) for f in findings if f.status != "ok"] == []
    assert {r.rtype for r in expected} >= {"A", "MX", "TXT", "SRV", "CNAME", "CAA"}


def test_each_record_missing_is_named(expected):
    for i, gone in enumerate(expected):
        with Zone(DOMAIN, expected[:i] + expected[i + 1 :]) as zone:
            findings = check(expected, zone.address)
        bad = [(f.record, f.status) for f in findings if f.status != "ok"]
        if gone.rtype == "A":
            # without the address, MX/SRV/CNAME targets still exist as names: the A itself
            assert (gone, "missing") in bad, bad
        else:
            assert bad == [(gone, "missing")], (gone, bad)


def test_each_record_changed_is_named_with_what_was_found(expected):
    changes = {
        "MX": "20 other.example.org.",
        "TXT": '"v=spf1 -all"',
        "SRV": "0 1 1 chat.example.org.",
        "CNAME": "other.example.org.",
        "CAA": '0 issue "other-ca.example"',
    }
    for i, rec in enumerate(expected):
        if rec.rtype not in changes:
            continue
        value = changes[rec.rtype]
        if rec.rtype == "TXT":  # the same kind of TXT with another value
            value = '"' + rec.value.strip('"').split(";")[0] + '; changed"'
        served = [*expected[:i], dataclasses.replace(rec, value=value), *expected[i + 1 :]]
        if rec.rtype == "CNAME":
            served.append(dataclasses.replace(expected[0], name="other.example.org"))
        with Zone(DOMAIN, served) as zone:
            findings = check(expected, zone.address)
        bad = [f for f in findings if f.status != "ok"]
        assert [(f.record, f.status) for f in bad] == [(rec, "wrong")], (rec, bad)


def test_command_exit_status(expected, tmp_path):
    ini = tmp_path / "chatmail.ini"
    ini.write_text(f"[params]\nmail_domain = {DOMAIN}\nacme_email = admin@example.org\n"
                   f"dkim_key_path = {tmp_path}/none\n")  # fmt: skip
    cmd = [sys.executable, "-m", "chatmaild.admin.main", "--config", str(ini), "dns"]
    printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"_mta-sts.{DOMAIN}. 3600 IN TXT" in printed
    with Zone(DOMAIN, expected) as zone:
        res = subprocess.run([*cmd, "--check", "--resolver", zone.address],
                             capture_output=True, text=True)  # fmt: skip
    # every record there, but the relay's own DKIM key is not readable here: named
    assert res.returncode == 1 and "missing DKIM" in res.stdout, res.stdout
    assert "ok      chat.example.org MX" in res.stdout
