"""chatmail-acme's pure parts: when to renew, what a failure says, the certificate swap."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

from chatmaild.acme import tlsdir
from chatmaild.acme.certificate import parse_pem, renewal_reason
from chatmaild.acme.dehydrated import failure_reason
from chatmaild.acme.main import backoff, skip_reason
from chatmaild.common.config import Config

UTC = datetime.UTC


def make_cert(tmp: Path, name: str, days: int, names: str) -> tuple[bytes, bytes]:
    key, cert = tmp / f"{name}.key", tmp / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", str(days), "-subj", f"/CN={name}", "-addext",
         f"subjectAltName={names}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert.read_bytes(), key.read_bytes()


def test_renewal_reasons(tmp_path):
    pem, _ = make_cert(tmp_path, "a", 90, "DNS:c.example,DNS:mta-sts.c.example")
    info = parse_pem(pem)
    names = ("c.example", "mta-sts.c.example")
    assert info.covers(names) and info.self_signed
    assert renewal_reason(None, names, info.not_before) == "no certificate yet"
    assert renewal_reason(info, names, info.not_before) == "only a self-signed certificate"
    ca_issued = info.__class__(**{**info.__dict__, "self_signed": False})
    assert renewal_reason(ca_issued, names, info.not_before + datetime.timedelta(days=59)) is None
    due = renewal_reason(ca_issued, names, info.not_before + datetime.timedelta(days=61))
    assert due is not None and due.startswith("the certificate expires on")
    gone = renewal_reason(ca_issued, names, info.not_after + datetime.timedelta(seconds=1))
    assert gone is not None and "expired" in gone
    more = renewal_reason(ca_issued, (*names, "new.c.example"), info.not_before)
    assert more == "the certificate does not cover new.c.example"


def test_failure_reason_prefers_the_cas_detail():
    out = (
        " + Requesting new certificate order from CA...\n"
        ' + ERROR: Challenge is invalid! (returned: invalid) (result: {"type": "http-01",'
        ' "error": {"type": "urn:ietf:params:acme:error:dns", "detail": "no valid A records'
        ' found for mta-sts.c.example", "status": 400}})\n'
    )
    assert failure_reason(out) == (
        "Challenge is invalid!: no valid A records found for mta-sts.c.example"
    )
    curl = "ERROR: Problem connecting to server (get for https://x/dir; curl returned with 7)\n"
    assert failure_reason(curl).startswith("Problem connecting to server")
    assert failure_reason("") == "dehydrated failed without a message"


def test_backoff_doubles_up_to_a_day():
    hours = [backoff(n).total_seconds() / 3600 for n in range(1, 8)]
    assert hours == [1, 2, 4, 8, 16, 24, 24]


def test_who_gets_no_certificate_from_a_ca(tmp_path):
    assert skip_reason(Config(mail_domain="c.example")) is None
    assert "IP-only" in skip_reason(Config(mail_domain="[192.0.2.1]"))
    assert "_-prefixed" in skip_reason(Config(mail_domain="_test.example"))
    assert "empty" in skip_reason(Config(mail_domain="c.example", acme_directory=""))
    pair = (f"{tmp_path}/c.pem", f"{tmp_path}/k.pem")
    external = Config(mail_domain="c.example", tls_external_cert_and_key=pair)
    assert "tls_external" in skip_reason(external)
    assert skip_reason(external, tmp_path) is None  # make run: its own directory, named


def test_install_swaps_certificate_and_key_together(tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    cert0, key0 = make_cert(tmp_path, "self", 3650, "DNS:c.example")
    (tls / "cert.pem").write_bytes(cert0)
    (tls / "key.pem").write_bytes(key0)
    old_umask = os.umask(0o077)  # chatmail-acme's unit: UMask=0077
    try:
        for n in range(4):
            cert, key = make_cert(tmp_path, f"ca{n}", 90, "DNS:c.example")
            tlsdir.install(tls, cert, key, None)
            assert oct(tlsdir.served(tls).stat().st_mode & 0o777) == "0o755"
            assert (tls / "cert.pem").read_bytes() == cert
            assert (tls / "key.pem").read_bytes() == key
            assert (tls / "cert.pem").is_symlink() and (tls / "key.pem").is_symlink()
            assert oct((tls / "key.pem").stat().st_mode & 0o777) == "0o640"
            assert oct((tls / "cert.pem").stat().st_mode & 0o777) == "0o644"
    finally:
        os.umask(old_umask)
    assert (tls / "self-signed/cert.pem").read_bytes() == cert0  # kept as the fallback
    # the served pair and the one before it; older ones removed
    assert len(list(tls.glob("acme-*"))) == 2
