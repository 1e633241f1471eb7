"""Regenerate the filter test corpus in this directory with real OpenPGP tools.

Run from the repository root:  .venv/bin/python tests/mail-data/make_corpus.py

Needs Debian's ``gpg`` and ``sq`` (apt package ``sq``) and the Delta Chat core
(``deltachat-rpc-server`` in .venv).  Keys are generated in throw-away homes,
so every run yields new ciphertexts; the *shape* of each file is what the tests
rely on.  ``--no-deltachat`` skips the Delta Chat core messages.

The core is run offline: two profiles get a pseudo transport, their SMTP
candidate is pointed at an aiosmtpd server on 127.0.0.1 that captures what the
core sends, and nothing else is contacted.

Files are templates with CRLF line endings: ``{from_addr}``, ``{to_addr}`` and
``{subject}`` stand for the envelope/header values the tests fill in (plain
``str.replace``, so braces elsewhere need no escaping).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from testing.mails import armor as _armor  # noqa: E402

ALICE = "alice@example.org"
BOB = "bob@example.org"
INNER = (
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"Subject: Hello\r\n\r\n"
    b"Hello world, this text is only readable after decryption.\r\n"
)


def run(*cmd: str, stdin: bytes = b"", env: dict | None = None) -> bytes:
    return subprocess.run(
        cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True, env=env
    ).stdout


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def dearmor_loose(text: bytes) -> bytes:
    """Binary of an armored block (tool output we trust; not the strict checker)."""
    lines = text.replace(b"\r\n", b"\n").split(b"\n")
    start = lines.index(b"") + 1
    body = [ln for ln in lines[start:] if ln and not ln.startswith((b"=", b"-----"))]
    return base64.b64decode(b"".join(body))


def armor(binary: bytes, headers: tuple[bytes, ...] = (), crc: bool = True) -> bytes:
    return _armor(binary, headers, crc)


def pgp_mime(payload: bytes, boundary: str = "Gx2JcB3pDwVnF7tq", extra: bytes = b"") -> bytes:
    """An RFC 3156 message the way chat clients lay it out."""
    b = boundary.encode()
    return (
        crlf(
            b"From: <{from_addr}>\n"
            b"To: <{to_addr}>\n"
            b"Subject: {subject}\n"
            b"Date: Sun, 15 Mar 2026 10:00:00 +0000\n"
            b"Message-ID: <corpus." + b + b"@example.org>\n"
            b"Chat-Version: 1.0\n" + extra + b"MIME-Version: 1.0\n"
            b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\n'
            b' boundary="' + b + b'"\n'
            b"\n"
            b"--" + b + b"\n"
            b"Content-Type: application/pgp-encrypted; charset=utf-8\n"
            b"Content-Description: PGP/MIME version identification\n"
            b"Content-Transfer-Encoding: 7bit\n"
            b"\n"
            b"Version: 1\n"
            b"\n"
            b"--" + b + b"\n"
            b'Content-Type: application/octet-stream; name="encrypted.asc"\n'
            b"Content-Description: OpenPGP encrypted message\n"
            b'Content-Disposition: inline; filename="encrypted.asc"\n'
            b"Content-Transfer-Encoding: 7bit\n"
            b"\n"
        )
        + crlf(payload)
        + crlf(b"\n--" + b + b"--\n")
    )


class GnuPG:
    def __init__(self, home: str):
        os.makedirs(home, mode=0o700)
        self.env = dict(os.environ, GNUPGHOME=home)
        for uid in (BOB, "carol@example.org"):
            run(
                "gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                f"<{uid}>", "future-default", "default", "never", env=self.env,
            )  # fmt: skip

    def close(self) -> None:
        """Stop the gpg-agent that gpg started for this home."""
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=self.env, check=False)

    def gpg(self, *args: str, stdin: bytes = INNER) -> bytes:
        return run("gpg", "--batch", "--yes", "--trust-model", "always", *args, stdin=stdin,
                   env=self.env)  # fmt: skip


def make_sq(tmp: Path) -> bytes:
    key = tmp / "sq-bob.key"
    cert = tmp / "sq-bob.cert"
    run("sq", "key", "generate", "--userid", f"<{BOB}>", "--export", str(key))
    cert.write_bytes(run("sq", "key", "extract-cert", str(key)))
    # a pipe of unknown length: sq writes the SEIPD with partial body lengths
    return run("sq", "encrypt", "--recipient-cert", str(cert), stdin=INNER * 200)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deltachat_messages(tmp: Path) -> dict[str, bytes]:
    """Let the real Delta Chat core send a few messages and capture them."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult
    from deltachat_rpc_client import DeltaChat, Rpc

    got: list[tuple[str, list[str], bytes]] = []

    class Capture:
        async def handle_DATA(self, server, session, envelope):
            got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
            return "250 OK"

    port = free_port()
    ctl = Controller(
        Capture(), hostname="127.0.0.1", port=port, auth_require_tls=False,
        authenticator=lambda *a: AuthResult(success=True),
    )  # fmt: skip
    ctl.start()
    exe = str(Path(sys.executable).parent / "deltachat-rpc-server")
    accounts = str(tmp / "dc-accounts")
    try:
        with Rpc(accounts_dir=accounts, executable=exe) as rpc:
            dc = DeltaChat(rpc)
            for addr in (ALICE, BOB, "carol@example.org"):
                acc = dc.add_account()
                acc.add_pseudo_transport(addr)
                acc.set_config("configured_addr", addr)
        # point each profile's SMTP candidate at the capturing server
        for db in Path(accounts).glob("*/dc.db"):
            con = sqlite3.connect(db)
            (param,) = con.execute("SELECT configured_param FROM transports").fetchone()
            param = json.loads(param)
            conn = {"host": "127.0.0.1", "port": port, "security": "Plain"}
            param["smtp"] = [{"connection": conn, "user": "x"}]
            param["smtp_password"] = "x"
            con.execute("UPDATE transports SET configured_param=?", (json.dumps(param),))
            con.commit()
            con.close()
        with Rpc(accounts_dir=accounts, executable=exe) as rpc:
            dc = DeltaChat(rpc)
            alice, bob, carol = sorted(dc.get_all_accounts(), key=lambda a: a.id)
            wanted = []

            def send(name, action):
                before = len(got)
                action()
                for acc in (alice, bob, carol):
                    acc.start_io()
                deadline = time.time() + 30
                while len(got) == before and time.time() < deadline:
                    time.sleep(0.2)
                time.sleep(1)
                for acc in (alice, bob, carol):
                    acc.stop_io()
                wanted.append((name, before))

            [bob_c] = alice.import_vcard(bob.make_vcard([bob.self_contact]))
            [carol_c] = alice.import_vcard(carol.make_vcard([carol.self_contact]))
            send("encrypted-deltachat", lambda: bob_c.create_chat().send_text("Hello from core"))
            group = alice.create_group("corpus group")
            group.add_contact(bob_c)
            group.add_contact(carol_c)
            send("encrypted-deltachat-group", lambda: group.send_text("Hello group"))
            qr = alice.get_qr_code()
            send("securejoin-v3-deltachat", lambda: bob.secure_join(qr))
            # without v=3 the joiner falls back to the legacy cleartext vc-request
            legacy_qr = qr.replace("&v=3", "")
            send("securejoin-vc-deltachat", lambda: carol.secure_join(legacy_qr))
    finally:
        ctl.stop()
    out = {}
    for name, index in wanted:
        if index < len(got):
            out[name] = got[index][2]
    return out


def template_addresses(msg: bytes, sender: str, rcpt: str | None) -> bytes:
    """Replace the concrete addresses in the header block by placeholders."""
    head, sep, body = msg.partition(b"\r\n\r\n")
    head = head.replace(sender.encode(), b"{from_addr}")
    if rcpt:
        head = head.replace(rcpt.encode(), b"{to_addr}")
    return head + sep + body


HAND_BUILT = {
    "plain.eml": b"""From: <{from_addr}>
To: <{to_addr}>
Subject: {subject}
Date: Sun, 15 Mar 2026 10:00:00 +0000
Message-ID: <plain.1@example.org>
Chat-Version: 1.0
Autocrypt: addr={from_addr}; prefer-encrypt=mutual; keydata=mDMEZfQ2uBYJKwYBBAHaRw8BAQdA
 kQZkSRB9zBvR8RkuZ2QUH1d3Ge3YnMuYvOQ2nO1nOEu0E0FsaWNlQGV4YW1wbGUub3JnPg==
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8; format=flowed; delsp=no

Meow!
""",
    "fake-encrypted.eml": b"""From: <{from_addr}>
To: <{to_addr}>
Subject: {subject}
Date: Sun, 15 Mar 2026 10:00:00 +0000
Message-ID: <fake.1@example.org>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

-----BEGIN PGP MESSAGE-----

Hi!
-----END PGP MESSAGE-----
""",
    "mdn.eml": b"""From: <{from_addr}>
To: <{to_addr}>
Subject: Receipt Notification
Date: Sun, 15 Mar 2026 10:00:00 +0000
Message-ID: <mdn.1@example.org>
Auto-Submitted: auto-replied
Chat-Version: 1.0
MIME-Version: 1.0
Content-Type: multipart/report; report-type=disposition-notification;
 boundary="kJBbU58X1xeWNHgBtTbMk80M5qnV4N"

--kJBbU58X1xeWNHgBtTbMk80M5qnV4N
Content-Type: text/plain; charset=utf-8

The "Hello" message you sent was displayed on the screen of the recipient.

--kJBbU58X1xeWNHgBtTbMk80M5qnV4N
Content-Type: message/disposition-notification

Reporting-UA: Delta Chat 2.65.0
Original-Recipient: rfc822;{to_addr}
Final-Recipient: rfc822;{to_addr}
Original-Message-ID: <orig.1@example.org>
Disposition: manual-action/MDN-sent-automatically; displayed

--kJBbU58X1xeWNHgBtTbMk80M5qnV4N--
""",
    "securejoin-vc.eml": b"""From: <{from_addr}>
To: <{to_addr}>
Subject: {subject}
Date: Sun, 15 Mar 2026 10:00:00 +0000
Message-ID: <sj.1@example.org>
Chat-Version: 1.0
Secure-Join: vc-request
Secure-Join-Invitenumber: sQ4ib5hjT0lyqn6ymKAiAQe8
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ"

--YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ
Content-Type: text/plain; charset=utf-8

Secure-Join: vc-request

--YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ--
""",
    "securejoin-vc-fake.eml": b"""From: <{from_addr}>
To: <{to_addr}>
Subject: {subject}
Date: Sun, 15 Mar 2026 10:00:00 +0000
Message-ID: <sj.2@example.org>
Chat-Version: 1.0
Secure-Join: vc-request
Secure-Join-Invitenumber: sQ4ib5hjT0lyqn6ymKAiAQe8
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ"

--YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ
Content-Type: text/plain; charset=utf-8

Buy viagra!

--YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ--
""",
    "securejoin-vc-extra-part.eml": b"""From: <{from_addr}>
To: <{to_addr}>
Subject: {subject}
Date: Sun, 15 Mar 2026 10:00:00 +0000
Message-ID: <sj.3@example.org>
Secure-Join: vc-request
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ"

--YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ
Content-Type: text/plain; charset=utf-8

Secure-Join: vc-request

--YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ
Content-Type: text/plain; charset=utf-8

Buy viagra!

--YWnVc0KjXpjGXzTaGY1oXSVMDlfMOZ--
""",
    "securejoin-vg.eml": b"""From: <{from_addr}>
To: <{to_addr}>
Subject: {subject}
Date: Sun, 15 Mar 2026 10:00:00 +0000
Message-ID: <sj.4@example.org>
Chat-Version: 1.0
Secure-Join: vg-request
Secure-Join-Invitenumber: 9bhFvfE4bmsEfJ0YfPV3Rw2f
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="Ov0yb5l0jaM6C1sCQdgZfIV2m0uPMd"

--Ov0yb5l0jaM6C1sCQdgZfIV2m0uPMd
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Secure-Join: vg-request

--Ov0yb5l0jaM6C1sCQdgZfIV2m0uPMd--
""",
    "asm.eml": b"""From: <{from_addr}>
To: <{to_addr}>
Subject: Autocrypt Setup Message
Date: Sun, 15 Mar 2026 10:00:00 +0000
Message-ID: <asm.1@example.org>
Autocrypt-Setup-Message: v1
Chat-Version: 1.0
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="I1XhdFDDP84oHvxoTVHKVCl7sgHHfg"

--I1XhdFDDP84oHvxoTVHKVCl7sgHHfg
Content-Type: text/plain; charset=utf-8

This is the Autocrypt Setup Message used to transfer your end-to-end setup
between clients. To decrypt and use your setup, open the message in an
Autocrypt-compliant client and enter the setup code presented on the
generating device.

--I1XhdFDDP84oHvxoTVHKVCl7sgHHfg
Content-Type: application/autocrypt-setup
Content-Disposition: attachment; filename="autocrypt-setup-message.html"

<!DOCTYPE html>
<html><body><p>This is the Autocrypt setup file used to transfer keys between clients.</p>
<pre>
-----BEGIN PGP MESSAGE-----
Passphrase-Format: numeric9x4
Passphrase-Begin: 17

wy4ECQMI0jNRBQfVKHVg1+a2Yihd6JAjR9H0kk3oDVeX7nc4Oi+IuEtfwWAhQFhn
=2Crd
-----END PGP MESSAGE-----
</pre></body></html>

--I1XhdFDDP84oHvxoTVHKVCl7sgHHfg--
""",
    "mailer-daemon.eml": b"""Return-Path: <>
From: MAILER-DAEMON@example.org (Mail Delivery System)
To: <{to_addr}>
Subject: Undelivered Mail Returned to Sender
Date: Sun, 15 Mar 2026 10:00:00 +0000
Message-ID: <20260315100000.5A1B2C3D4E@example.org>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
 boundary="5A1B2C3D4E.1773568800/example.org"

This is a MIME-encapsulated message.

--5A1B2C3D4E.1773568800/example.org
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<nobody@example.org>: unknown user: "nobody"

--5A1B2C3D4E.1773568800/example.org
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; example.org
X-Postfix-Queue-ID: 5A1B2C3D4E
Arrival-Date: Sun, 15 Mar 2026 10:00:00 +0000 (UTC)

Final-Recipient: rfc822; nobody@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: X-Postfix; unknown user: "nobody"

--5A1B2C3D4E.1773568800/example.org
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

From: <{to_addr}>
To: <nobody@example.org>
Subject: [...]

--5A1B2C3D4E.1773568800/example.org--
""",
}


def main() -> None:
    want_dc = "--no-deltachat" not in sys.argv
    files: dict[str, bytes] = {n: crlf(t) for n, t in HAND_BUILT.items()}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        gnupg = GnuPG(str(tmp / "gnupg"))
        # GnuPG: legacy PKESK header, new-format SEIPD
        enc = gnupg.gpg("-a", "-e", "-r", BOB)
        files["encrypted.eml"] = pgp_mime(enc)
        files["encrypted-ipv4.eml"] = files["encrypted.eml"].replace(
            b"From: <{from_addr}>", b"From: <one@[192.0.2.0]>"
        )
        files["encrypted-ipv6.eml"] = files["encrypted.eml"].replace(
            b"From: <{from_addr}>", b"From: <one@[IPv6:2001:db8::1]>"
        )
        # a pipe of ~12 KB: GnuPG switches the SEIPD to partial body lengths
        files["encrypted-gpg-partial.eml"] = pgp_mime(
            gnupg.gpg("-a", "-e", "-z", "0", "-r", BOB, stdin=INNER * 200)
        )
        files["encrypted-gpg-multi.eml"] = pgp_mime(
            gnupg.gpg("-a", "-e", "-r", BOB, "-r", "carol@example.org")
        )
        files["encrypted-symmetric.eml"] = pgp_mime(
            gnupg.gpg("-a", "-c", "--passphrase", "secret", "--pinentry-mode", "loopback")
        )
        files["encrypted-version-header.eml"] = pgp_mime(
            gnupg.gpg("-a", "-e", "-r", BOB, "--emit-version", "--comment", "https://gopenpgp.org")
        )
        binary = dearmor_loose(enc)
        files["encrypted-protonmail.eml"] = pgp_mime(
            armor(binary, (b"Version: ProtonMail", b"Comment: https://protonmail.com"))
        )
        # CRC-less armor (RFC 9580 style); make sure base64 padding is present
        nocrc = enc
        while len(dearmor_loose(nocrc)) % 3 == 0:
            nocrc = gnupg.gpg("-a", "-e", "-r", BOB)
        files["encrypted-nocrc.eml"] = pgp_mime(armor(dearmor_loose(nocrc), crc=False))
        # quoted-printable / base64 transfer encodings of the payload part
        b64_part = pgp_mime(enc).replace(
            b"Content-Transfer-Encoding: 7bit\r\n\r\n-----BEGIN",
            b"Content-Transfer-Encoding: base64\r\n\r\n-----BEGIN",
        )
        armored = crlf(enc)
        b64 = base64.encodebytes(armored).replace(b"\n", b"\r\n")
        files["encrypted-b64-part.eml"] = b64_part.replace(armored, b64)
        # not encrypted, but wrapped exactly like an encrypted message
        files["literal.eml"] = pgp_mime(gnupg.gpg("-a", "--store", "-z", "0"))
        files["compressed.eml"] = pgp_mime(gnupg.gpg("-a", "--store", "-z", "6"))
        files["signed-compressed.eml"] = pgp_mime(gnupg.gpg("-a", "-s", "-u", BOB))
        files["signed-uncompressed.eml"] = pgp_mime(gnupg.gpg("-a", "-s", "-z", "0", "-u", BOB))
        sig = gnupg.gpg("--detach-sign", "-u", BOB)
        files["signature-only.eml"] = pgp_mime(armor(sig))
        files["truncated.eml"] = pgp_mime(armor(binary[:-7]))
        files["trailing-garbage.eml"] = pgp_mime(armor(binary + b"\x00garbage"))
        files["armor-truncated.eml"] = pgp_mime(crlf(enc)[: len(enc) // 2])
        files["encrypted-three-parts.eml"] = pgp_mime(enc).replace(
            b"\r\n--Gx2JcB3pDwVnF7tq--",
            b"\r\n--Gx2JcB3pDwVnF7tq\r\nContent-Type: text/plain\r\n\r\nBuy now!\r\n"
            b"\r\n--Gx2JcB3pDwVnF7tq--",
        )
        gnupg.close()
        files["encrypted-sq.eml"] = pgp_mime(make_sq(tmp))
        if want_dc:
            senders = {
                "encrypted-deltachat": (ALICE, BOB),
                "encrypted-deltachat-group": (ALICE, None),
                "securejoin-v3-deltachat": (BOB, ALICE),
                "securejoin-vc-deltachat": ("carol@example.org", ALICE),
            }
            for name, msg in deltachat_messages(tmp).items():
                sender, rcpt = senders[name]
                files[name + ".eml"] = template_addresses(crlf(msg), sender, rcpt)
    for name, data in sorted(files.items()):
        (HERE / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
