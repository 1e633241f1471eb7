"""A certificate from an ACME CA (issue 20): Debian's pebble issues it to a make-run relay.

pebble (Let's Encrypt's test CA) runs on loopback and resolves the relay's names
through a DNS server of the test; it validates HTTP-01 on the relay's plain-HTTP
port, where the web process serves what chatmail-acme (through dehydrated) put
in the challenge directory.  Clients that trust only pebble's root then verify
every TLS port of the relay: implicit TLS and STARTTLS alike.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from chatmaild.acme.certificate import parse_pem
from chatmaild.relay.dns import LoopbackDNS
from testing import mails, tlsprobe
from testing.pebble import Pebble
from tests.sandbox import world_readable_tempdir

pytestmark = [pytest.mark.relay, pytest.mark.timeout(600)]
DOMAIN = "chat.acme.test"
NAMES = (DOMAIN, f"mta-sts.{DOMAIN}")
COMPONENTS = ("postfix", "dovecot", "doveauth", "filtermail", "newemail")
UNLIMITED = {"max_user_send_per_minute": 10**6, "max_user_send_burst_size": 10**6}


@pytest.fixture(scope="module")
def dns():
    with LoopbackDNS() as server:
        for name in NAMES:
            server.set_a(name, "127.0.0.1")
        yield server


@pytest.fixture(scope="module")
def relay(dns):
    from tests.fixtures.relay import RelayPool

    pool = RelayPool()
    try:
        # the CA comes per test (its URL is passed to chatmail-acme by the test)
        overrides = {"mail_domain": DOMAIN, "dns_resolver": dns.address, **UNLIMITED}
        yield pool(overrides, components=COMPONENTS)
    finally:
        pool.close()


@pytest.fixture
def workdir():
    d = world_readable_tempdir("pebble-")
    yield d
    subprocess.run(["rm", "-rf", str(d)])


def acme(relay, pebble: Pebble, *args: str) -> subprocess.CompletedProcess:
    """chatmail-acme of this relay, asking ``pebble`` (the ini's acme_directory)."""
    ini = relay.ini_path.read_text()
    lines = [line for line in ini.splitlines() if not line.startswith("acme_directory")]
    relay.ini_path.write_text("\n".join([*lines, f"acme_directory = {pebble.directory}", ""]))
    cmd = relay.acme_command(*args, ca_bundle=str(pebble.directory_ca))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def verified(relay, root: Path, port_name: str) -> str:
    """sha256 of the certificate a client trusting only ``root`` verifies on a port."""
    kind = {"smtp": "smtp", "submission": "smtp", "imap": "imap"}.get(port_name, "tls")
    return tlsprobe.fingerprint(kind, "127.0.0.1", int(relay.ports[port_name]), DOMAIN, str(root))


TLS_PORTS = ("newemail", "submissions", "imaps", "smtp", "submission", "imap")


def served_fingerprint(relay) -> str:
    return parse_pem((relay.state_dir / "tls/cert.pem").read_bytes()).fingerprint


def test_port_80_answers_challenges_and_redirects_the_rest(relay):
    challenges = relay.acme_dir / "challenges"
    challenges.mkdir(parents=True, exist_ok=True)
    (challenges / "tok-en_1").write_text("tok-en_1.thumbprint")
    base = f"http://127.0.0.1:{relay.ports['http']}"
    with urllib.request.urlopen(f"{base}/.well-known/acme-challenge/tok-en_1") as r:
        assert r.status == 200 and r.read() == b"tok-en_1.thumbprint"
    for bad in ("../etc/passwd", "nope", "a%2Fb", ""):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/.well-known/acme-challenge/{bad}")
        assert e.value.code == 404

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **kw):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(f"{base}/new?x=1", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(request)
    # to the relay's own name and HTTPS port, whatever the Host said
    assert e.value.code == 301
    assert e.value.headers["Location"] == f"https://{DOMAIN}:{relay.ports['newemail']}/new"


def test_certificate_from_the_ca_on_every_port_while_mail_flows(relay, workdir):
    self_signed = served_fingerprint(relay)
    with Pebble(workdir, relay.config.dns_resolver, int(relay.ports["http"])) as pebble:
        root = workdir / "root.pem"
        root.write_bytes(pebble.root_pem())
        with pytest.raises(ssl.SSLCertVerificationError):
            verified(relay, root, "imaps")  # self-signed: not trusted yet

        # mail submitted all along: not one refused or lost by the switch
        with MailFlow(relay) as flow:
            res = acme(relay, pebble)
        assert res.returncode == 0, res.stderr
        assert "ACME: serving the new certificate for " + " ".join(NAMES) in res.stderr
        info = parse_pem((relay.state_dir / "tls/cert.pem").read_bytes())
        assert info.fingerprint != self_signed and set(NAMES) <= info.names
        assert not info.self_signed
        for port_name in TLS_PORTS:
            assert verified(relay, root, port_name) == info.fingerprint, port_name
        flow.check()
        # the MTA-STS policy, on the name the certificate covers for it
        ctx = ssl.create_default_context(cafile=str(root))
        raw = socket.create_connection(("127.0.0.1", int(relay.ports["newemail"])), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=NAMES[1]) as tls:
            tls.sendall(f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {NAMES[1]}\r\n"
                        "Connection: close\r\n\r\n".encode())  # fmt: skip
            answer = b"".join(iter(lambda: tls.recv(4096), b"")).decode()
        assert answer.startswith("HTTP/1.1 200")
        assert f"mode: enforce\r\nmx: {DOMAIN}\r\n" in answer

        # not due: the CA is not asked again (a rerun of setup or the timer)
        again = acme(relay, pebble)
        assert again.returncode == 0 and "valid until" in again.stderr
        assert "ACME: asking" not in again.stderr and served_fingerprint(relay) == info.fingerprint


def test_short_lived_certificate_is_renewed_while_mail_flows(relay, workdir):
    # 30 s certificates: due 20 s after issuance (a third of the lifetime left)
    with Pebble(workdir, relay.config.dns_resolver, int(relay.ports["http"]),
                validity_seconds=30) as pebble:  # fmt: skip
        root = workdir / "root.pem"
        root.write_bytes(pebble.root_pem())
        first = acme(relay, pebble)
        assert first.returncode == 0, first.stderr
        issued = parse_pem((relay.state_dir / "tls/cert.pem").read_bytes())
        assert issued.lifetime.total_seconds() <= 31
        # (that a certificate not yet due is left alone: the test above)
        time.sleep(max(0.0, (issued.renew_at() - _now()).total_seconds()) + 1)
        with MailFlow(relay) as flow:
            renewed = acme(relay, pebble)
        assert renewed.returncode == 0, renewed.stderr
        assert "the certificate expires on" in renewed.stderr  # why it asked
        fresh = served_fingerprint(relay)
        assert fresh != issued.fingerprint
        for port_name in TLS_PORTS:
            assert verified(relay, root, port_name) == fresh, port_name
        flow.check()


def test_ca_down_or_refusing_keeps_serving_and_later_switches(relay, workdir, dns):
    before = served_fingerprint(relay)
    pebble = Pebble(workdir, relay.config.dns_resolver, int(relay.ports["http"]))
    # the CA unreachable (nothing listens on its port yet)
    down = acme(relay, pebble, "--force")
    assert down.returncode == 1
    lines = [line for line in down.stderr.splitlines() if "ACME: no certificate" in line]
    assert len(lines) == 1, down.stderr
    assert pebble.directory in lines[0] and "next attempt after" in lines[0]
    assert "Problem connecting" in lines[0] or "curl" in lines[0], lines[0]
    assert served_fingerprint(relay) == before
    with socket.create_connection(("127.0.0.1", int(relay.ports["imaps"])), timeout=10) as raw:
        ctx = ssl._create_unverified_context()
        with ctx.wrap_socket(raw) as tls:  # still served, the certificate unchanged
            assert hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest() == before
    # within the back-off: the CA is not asked again
    waiting = acme(relay, pebble)
    if "valid until" not in waiting.stderr:  # a certificate that is not due needs no CA
        assert "waiting until" in waiting.stderr and "ACME: asking" not in waiting.stderr
    with pebble:
        root = workdir / "root.pem"
        root.write_bytes(pebble.root_pem())
        # the CA refuses: a name of the certificate does not resolve
        dns.remove(NAMES[1])
        try:
            refused = acme(relay, pebble, "--force")
        finally:
            dns.set_a(NAMES[1], "127.0.0.1")
        assert refused.returncode == 1
        line = next(x for x in refused.stderr.splitlines() if "ACME: no certificate" in x)
        assert NAMES[1] in line, line  # the CA's own reason, naming the name
        assert served_fingerprint(relay) == before
        # the next attempt (the timer's, after the back-off) succeeds: served at once
        ok = acme(relay, pebble, "--ignore-backoff", "--force")
        assert ok.returncode == 0, ok.stderr
        after = served_fingerprint(relay)
        assert after != before and verified(relay, root, "submissions") == after


def _now():
    import datetime

    return datetime.datetime.now(datetime.UTC)


class MailFlow:
    """Submits mail while the block runs; ``check()``: none refused, all delivered."""

    def __init__(self, relay) -> None:
        self.relay = relay
        self.sender, self.recipient = relay.new_credentials(), relay.new_credentials()
        relay.imap(*self.recipient).logout()
        self.stop, self.sent, self.failures = threading.Event(), 0, []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        addr, rcpt = self.sender[0], self.recipient[0]
        with self.relay.smtp(*self.sender) as smtp:
            while not self.stop.is_set():
                message = mails.encrypted_message(addr, [rcpt])
                try:
                    smtp.sendmail(addr, [rcpt], message)
                    self.sent += 1
                except Exception as e:  # noqa: BLE001
                    self.failures.append(repr(e))
                    return
                time.sleep(0.02)

    def __enter__(self) -> MailFlow:
        self.thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.5)
        self.stop.set()
        self.thread.join(30)

    def check(self) -> None:
        assert self.failures == [] and self.sent > 0
        inbox = Path(self.relay.config.mailboxes_dir) / self.recipient[0]
        deadline = time.monotonic() + 60  # a loaded CI machine
        while True:
            dirs = [inbox / d for d in ("new", "cur") if (inbox / d).is_dir()]
            got = sum(len(list(d.iterdir())) for d in dirs)
            if got >= self.sent:
                break
            if time.monotonic() > deadline:
                log = (self.relay.log_dir / "postfix.log").read_text(errors="replace")
                odd = [x for x in log.splitlines() if "status=" in x and "status=sent" not in x]
                raise AssertionError(f"{got} of {self.sent} delivered: {odd[-10:]}")
            time.sleep(0.1)


def test_federation_under_verify(relay, dns, workdir):
    """A second relay that delivers only to peers whose certificate verifies (what every
    chatmail relay does), trusting only pebble's root, delivers to ours; ours to it."""
    from tests.fixtures.relay import RelayPool

    with Pebble(workdir, relay.config.dns_resolver, int(relay.ports["http"])) as pebble:
        root = workdir / "root.pem"
        root.write_bytes(pebble.root_pem())
        res = acme(relay, pebble, "--force")
        assert res.returncode == 0, res.stderr
        pool = RelayPool()
        try:
            # Postfix's smtp client delivers (mxdeliv_send = no): its verify policy
            # is what this test checks (HTTPS delivery's checks: test_mxdeliv_send)
            peer = pool({"mail_domain": "peer.acme.test", "dns_resolver": dns.address,
                         "mxdeliv_send": False, **UNLIMITED}, components=COMPONENTS)  # fmt: skip
            for r in (relay, peer):
                dns.set_txt(*r.dkim_record())
            peer.add_peer(relay)
            relay.add_peer(peer)
            conf = str(peer.layout.postfix_config_dir)
            port = relay.ports["smtp"]
            policy = peer.layout.postfix_config_dir / "tls_policy"
            # its nexthop is an address on loopback: the name to verify is ours
            policy.write_text(f"/^\\[127\\.0\\.0\\.1\\]:{port}$/ verify match={DOMAIN}\n"
                              + policy.read_text())  # fmt: skip
            subprocess.run(["postconf", "-c", conf, f"smtp_tls_CAfile = {root}",
                            "smtp_tls_CApath =", "smtp_tls_security_level = verify"],
                           check=True)  # fmt: skip
            subprocess.run(["postfix", "-c", conf, "reload"], check=True, capture_output=True)
            ours, theirs = relay.new_credentials(), peer.new_credentials()
            relay.imap(*ours).logout()
            peer.imap(*theirs).logout()
            with peer.smtp(*theirs) as smtp:
                smtp.sendmail(theirs[0], [ours[0]], mails.encrypted_message(theirs[0], [ours[0]]))
            with relay.smtp(*ours) as smtp:
                smtp.sendmail(ours[0], [theirs[0]], mails.encrypted_message(ours[0], [theirs[0]]))
            for r, addr in ((relay, ours[0]), (peer, theirs[0])):
                inbox = Path(r.config.mailboxes_dir) / addr / "new"
                deadline = time.monotonic() + 30
                while not (inbox.is_dir() and any(inbox.iterdir())):
                    log = (peer.log_dir / "postfix.log").read_text(errors="replace")
                    assert time.monotonic() < deadline, f"not delivered to {addr}:\n{log[-3000:]}"
                    time.sleep(0.2)
            log = (peer.log_dir / "postfix.log").read_text(errors="replace")
            assert f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{port}" in log
        finally:
            pool.close()


def test_dcaccount_link_under_certificate_checks(relay, workdir, tmp_path):
    """What an app does with the home page's ``DCACCOUNT:https://<domain>/new``: POST to
    it with certificate checks on (here: trusting only pebble's root), then log in.

    The real Delta Chat core cannot be the verifying client here: its strict TLS
    checks against webpki-roots compiled into the binary (chatmail/core
    src/net/tls.rs, ``wrap_rustls``: ``RootCertStore::from_iter(webpki_roots::
    TLS_SERVER_ROOTS...)``; no environment variable or file adds a root), so no
    test CA can be trusted by it.  The core does the rest: it logs in with the
    credentials the verified request handed out and is configured.
    """
    from testing.dcclient import DCClients

    with Pebble(workdir, relay.config.dns_resolver, int(relay.ports["http"])) as pebble:
        root = workdir / "root.pem"
        root.write_bytes(pebble.root_pem())
        res = acme(relay, pebble, "--force")
        assert res.returncode == 0, res.stderr
    ctx = ssl.create_default_context(cafile=str(root))
    port = int(relay.ports["newemail"])

    def https(method: str, path: str) -> tuple[str, bytes]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=DOMAIN) as tls:  # verified, or it raises
            tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: 0\r\n"
                        "Connection: close\r\n\r\n".encode())  # fmt: skip
            answer = b"".join(iter(lambda: tls.recv(65536), b""))
        head, _, body = answer.partition(b"\r\n\r\n")
        return head.decode(), body

    head, page = https("GET", "/")
    assert head.startswith("HTTP/1.1 200") and f"DCACCOUNT:https://{DOMAIN}/new".encode() in page
    head, body = https("POST", "/new")
    assert head.startswith("HTTP/1.1 200"), head
    creds = json.loads(body)
    assert creds["email"].endswith(f"@{DOMAIN}")
    clients = DCClients(tmp_path / "dc")
    try:
        acc = clients.account(relay, (creds["email"], creds["password"]))
        assert acc.list_transports()[0]["addr"] == creds["email"]
    finally:
        clients.close()
