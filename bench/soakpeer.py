"""Another mail domain for the soak (bench/bench_soak.py): port 25 in and out.

    python -m bench.soakpeer WORKDIR PEER_ADDRESS RELAY_ADDRESS RELAY_DOMAIN

Runs in a network namespace of its own, joined to the machine's by a veth pair
(PEER_ADDRESS and RELAY_ADDRESS are public-looking addresses: the relay does not
deliver to private ones).  It is ``peer.example``, an ordinary mail domain:

- DNS on PEER_ADDRESS:53 (the relay's ``dns_resolver``): the MX of peer.example
  and its DKIM key (ed25519, selector ``ed``);
- an SMTP server on PEER_ADDRESS:25 (aiosmtpd), STARTTLS with a certificate for
  the MX name from a CA of its own (WORKDIR/peer-ca.pem, which the machine
  trusts), no HTTPS: the relay tries /mxdeliv, is refused, and sends over SMTP.
  Each message received is written to WORKDIR/received-out as ``RCPT MESSAGE-ID
  DKIM`` (``pass`` when the relay's signature, WORKDIR/relay-dkim, verifies);
- a sender: once WORKDIR/accounts.json exists (tests/deb_load.py's), a DKIM-signed
  encrypted message to one of its recipients every 1/PEER_RATE s (default 1),
  each over a new SMTP connection to RELAY_ADDRESS:25 with STARTTLS, as another
  MTA would; each 250 is appended to WORKDIR/accepted-in.  It stops when
  WORKDIR/stop exists and then writes WORKDIR/peer-stopped; the server runs
  until SIGTERM.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

DOMAIN = "peer.example"
MX = "mx.peer.example"
SELECTOR = "ed"
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.I | re.M)


def _certificate(workdir: Path) -> tuple[Path, Path]:
    """A CA of the peer's own and the MX name's certificate from it."""
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ca, ca_key = workdir / "peer-ca.pem", workdir / "peer-ca.key"
    run("openssl", "req", "-x509", *ec, "-days", "3", "-subj", "/CN=soak peer CA",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    key, csr, cert = workdir / "peer-key.pem", workdir / "peer.csr", workdir / "peer-cert.pem"
    run("openssl", "req", *ec, "-subj", f"/CN={MX}", "-keyout", str(key), "-out", str(csr))
    ext = workdir / "peer.ext"
    ext.write_text(
        f"subjectAltName=DNS:{MX}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "3", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return cert, key


class Sink:
    """aiosmtpd's handler: every message received, with its DKIM result."""

    def __init__(self, workdir: Path) -> None:
        self.out = open(workdir / "received-out", "a")  # noqa: SIM115 (open while serving)
        self.record = workdir / "relay-dkim"  # written once the relay is set up
        self.lock = threading.Lock()

    def _dns(self, name: bytes, timeout: int = 5) -> bytes:
        known, _, txt = self.record.read_bytes().strip().partition(b" ")
        return txt if name.rstrip(b".") == known.rstrip(b".") else b""

    async def handle_DATA(self, server, session, envelope) -> str:
        import dkim as dkimpy

        content = envelope.original_content or envelope.content
        found = MESSAGE_ID.search(content)
        mid = found.group(1).decode() if found else "-"
        try:
            ok = dkimpy.verify(content, dnsfunc=self._dns)
        except Exception:  # noqa: BLE001 (a broken signature is a result, not a crash)
            ok = False
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.out.write(f"{rcpt} {mid} {'pass' if ok else 'fail'}\n")
            self.out.flush()
        return "250 2.0.0 received"


def _send(workdir: Path, peer: str, relay: str, relay_domain: str, key) -> None:
    from testing.mails import encrypted_message

    accounts = workdir / "accounts.json"
    stop = workdir / "stop"
    while not accounts.exists() and not stop.exists():
        time.sleep(0.5)
    rcpts = (
        [addr for addr, _ in json.loads(accounts.read_text())["rcpts"]] if accounts.exists() else []
    )
    pause = 1 / float(os.environ.get("PEER_RATE", "1"))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the relay's self-signed one
    errors: collections.Counter[str] = collections.Counter()
    i = 0
    with open(workdir / "accepted-in", "a") as accepted:
        while rcpts and not stop.exists():
            rcpt = rcpts[i % len(rcpts)]
            sender = f"sender{i % 7}@{DOMAIN}"
            msg = key.sign(encrypted_message(sender, [rcpt], subject=f"in {i}"), DOMAIN, SELECTOR)
            mid = MESSAGE_ID.search(msg).group(1).decode()
            try:
                with smtplib.SMTP(relay, 25, local_hostname=MX, timeout=30,
                                  source_address=(peer, 0)) as smtp:  # fmt: skip
                    smtp.starttls(context=ctx)
                    smtp.ehlo(MX)
                    smtp.sendmail(sender, [rcpt], msg)
                accepted.write(f"{rcpt} {mid}\n")
                accepted.flush()
            except (OSError, smtplib.SMTPException) as e:
                code = getattr(e, "smtp_code", None)
                errors[type(e).__name__ + (f" {code}" if code else "")] += 1
            i += 1
            time.sleep(pause)
    (workdir / "errors-in.json").write_text(json.dumps(errors))
    (workdir / "peer-stopped").touch()


def main(workdir: Path, peer: str, relay: str, relay_domain: str) -> int:
    from aiosmtpd.controller import Controller

    from chatmaild.relay.dns import LoopbackDNS
    from tests.fixtures.filtermail import Ed25519Key

    key = Ed25519Key.generate()
    cert, tls_key = _certificate(workdir)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, tls_key)
    dns = LoopbackDNS(peer, 53).start()
    dns.set_mx(DOMAIN, (10, MX))
    dns.set_a(MX, peer)
    dns.set_txt(f"{SELECTOR}._domainkey.{DOMAIN}", key.record())
    sink = Controller(Sink(workdir), hostname=peer, port=25, tls_context=tls,
                      require_starttls=True, server_hostname=MX,
                      data_size_limit=50_000_000)  # fmt: skip
    sink.start()
    sender = threading.Thread(target=_send, args=(workdir, peer, relay, relay_domain, key),
                              daemon=True)  # fmt: skip
    sender.start()
    print("ready", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    while not done.wait(1):
        pass
    sink.stop()
    dns.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), *sys.argv[2:5]))
