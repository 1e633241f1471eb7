"""Which certificate a client that trusts only one root verifies on a relay's ports.

    python -m testing.tlsprobe --name chat.example.org --cafile root.pem \\
        tls=127.0.0.1:443 smtp=127.0.0.1:25 imap=127.0.0.1:143 ...

prints one JSON object: each port's sha256 of the verified leaf certificate, or
``"error: ..."``.  ``tls``: implicit TLS; ``smtp`` and ``imap``: STARTTLS.  The
name is checked as a client checks it (server name indication and hostname).
"""

from __future__ import annotations

import argparse
import hashlib
import imaplib
import json
import smtplib
import socket
import ssl


def fingerprint(kind: str, host: str, port: int, name: str, cafile: str) -> str:
    ctx = ssl.create_default_context(cafile=cafile)
    if kind == "smtp":
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            smtp._host = name  # what starttls checks the certificate against
            smtp.starttls(context=ctx)
            der = smtp.sock.getpeercert(binary_form=True)
    elif kind == "imap":
        imap = imaplib.IMAP4(host, port, timeout=10)
        imap.host = name
        try:
            imap.starttls(ssl_context=ctx)
            der = imap.sock.getpeercert(binary_form=True)
        finally:
            imap.shutdown()
    else:
        raw = socket.create_connection((host, port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def probe(ports: dict[str, tuple[str, str, int]], name: str, cafile: str) -> dict[str, str]:
    """``ports``: label -> (kind, host, port)."""
    out = {}
    for label, (kind, host, port) in ports.items():
        try:
            out[label] = fingerprint(kind, host, port, name, cafile)
        except (OSError, ssl.SSLError, smtplib.SMTPException, imaplib.IMAP4.error) as e:
            out[label] = f"error: {e!r}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("ports", nargs="+", metavar="KIND=HOST:PORT")
    args = parser.parse_args(argv)
    ports = {}
    for spec in args.ports:
        kind, _, where = spec.partition("=")
        host, _, port = where.rpartition(":")
        ports[f"{kind}:{port}"] = (kind, host, int(port))
    print(json.dumps(probe(ports, args.name, args.cafile)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
