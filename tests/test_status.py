"""``chatmaild status`` (issue 23): healthy is exit 0; each problem is named, exit 1.

The judgements alone, then the command against a running relay: healthy, an
expired certificate, a stuck queue (mail for a peer that never answers) and a
full mail store (a 1 MB tmpfs mounted over it).  The units are checked on the
packaged relay (tests/test_deb.py).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chatmaild.admin.status import judge_certificate, judge_disk, judge_queue
from testing.dnsmasq import Zone
from tests.fixtures.relay import RelayPool

NOW = datetime.datetime(2026, 12, 6, tzinfo=datetime.UTC)


def test_certificate_judgement():
    assert judge_certificate(NOW + datetime.timedelta(days=60), NOW, 7).ok
    soon = judge_certificate(NOW + datetime.timedelta(days=3), NOW, 7)
    assert not soon.ok and soon.detail.startswith("3 days left")
    gone = judge_certificate(NOW - datetime.timedelta(days=2), NOW, 7)
    assert not gone.ok and gone.detail.startswith("expired 2 days ago")


def test_queue_judgement():
    assert judge_queue([], 1000.0, 60, 10).ok
    entries = [{"queue_name": "deferred", "arrival_time": 900}, {"queue_name": "active",
               "arrival_time": 990}]  # fmt: skip
    stuck = judge_queue(entries, 1000.0, 60, 10)
    assert not stuck.ok and stuck.detail == "2 message(s) (1 active, 1 deferred), oldest 100 s"
    assert judge_queue(entries, 1000.0, 600, 10).ok
    assert not judge_queue(entries, 1000.0, 600, 1).ok


def test_disk_judgement():
    full = os.statvfs_result((4096, 4096, 100, 5, 5, 100, 50, 50, 0, 255, 0))
    assert not judge_disk("/m", full, 90).ok  # 95 % of space
    inodes = os.statvfs_result((4096, 4096, 100, 50, 50, 100, 5, 5, 0, 255, 0))
    assert "95 % of inodes" in judge_disk("/m", inodes, 90).detail
    assert not judge_disk("/m", inodes, 90).ok


@pytest.fixture(scope="module")
def relay():
    pool = RelayPool()
    try:
        yield pool({}, ("postfix", "dovecot", "doveauth", "metadata", "filtermail"))
    finally:
        pool.close()


def status(relay, *args: str) -> tuple[int, dict]:
    res = subprocess.run(
        [sys.executable, "-m", "chatmaild.admin.main", "--config", str(relay.ini_path),
         "status", "--json", "--no-units",
         "--postfix-config", str(relay.layout.postfix_config_dir), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    report = json.loads(res.stdout)
    assert report["healthy"] is (res.returncode == 0), res.stdout
    return res.returncode, {c["name"]: c for c in report["checks"] if not c["ok"]}


def expired_certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_healthy_relay(relay):
    assert status(relay) == (0, {})


def test_expired_certificate_is_named(relay):
    path = Path(relay.config.tls_external_cert_and_key[0])
    good = path.read_bytes()
    try:
        path.write_bytes(expired_certificate())
        rc, problems = status(relay)
    finally:
        path.write_bytes(good)
    assert rc == 1 and list(problems) == ["certificate"]
    assert problems["certificate"]["detail"].startswith("expired 2 days ago")


def test_stuck_queue_is_named(relay):
    # a peer whose ports answer nothing: the message is deferred and stays
    relay.add_peer("dead.example", port=9, https_port=9)
    conf = str(relay.layout.postfix_config_dir)
    subprocess.run(
        ["sendmail", "-C", conf, "-f", f"root@{relay.mail_domain}", "nobody@dead.example"],
        input=b"Subject: stuck\r\n\r\nwaiting\r\n", check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        rc, problems = status(relay, "--queue-max-age", "1")
        if rc == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rc == 1 and list(problems) == ["queue"], problems
    assert "1 message(s)" in problems["queue"]["detail"]
    # with a threshold it is not over yet, the queue is no problem
    assert status(relay, "--queue-max-age", "3600")[0] == 0
    subprocess.run(["postsuper", "-c", conf, "-d", "ALL"], check=True, capture_output=True)


def test_full_mail_store_is_named(relay):
    store = relay.config.mailboxes_dir
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=64", "tmpfs", store],
                   check=True)  # fmt: skip
    try:
        Path(store, "filler").write_bytes(b"x" * 1024 * 1000)
        rc, problems = status(relay)
    finally:
        subprocess.run(["umount", store], check=True)
    assert rc == 1 and "disk" in problems
    used = int(problems["disk"]["detail"].split(": ")[1].split(" %")[0])
    assert used >= 90, problems["disk"]


def test_dns_records_with_dns(relay):
    """--dns asks a real DNS server (dnsmasq) for the records `chatmaild dns` prints:
    all served is healthy; one withheld is named."""
    from chatmaild.relay import dnsrecords
    from chatmaild.relay.system import _dkim_txt

    config = relay.config
    expected = dnsrecords.records(config, _dkim_txt(config))
    with Zone(config.mail_domain, expected) as zone:
        assert status(relay, "--dns", "--resolver", zone.address) == (0, {})
    mx = next(r for r in expected if r.rtype == "MX")
    with Zone(config.mail_domain, [r for r in expected if r is not mx]) as zone:
        rc, problems = status(relay, "--dns", "--resolver", zone.address)
    assert rc == 1 and f"MX {mx.name} missing" in problems["dns"]["detail"], problems
