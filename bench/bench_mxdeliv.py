"""Relay-to-relay delivery between two local relays: HTTPS /mxdeliv next to port 25.

The sending relay's filtermail transport posts to the peer's web port
(``mxdeliv_send = yes``, the default), or Postfix's own smtp client delivers
to its port 25 (``mxdeliv_send = no``).  Figures: messages a second for a
burst submitted over one connection, and submit -> in the peer's Maildir
latency of single messages.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import statistics
import time
from pathlib import Path

from bench.bench_relay import pct, state_dir
from chatmaild.relay import Relay, client_tls_context
from chatmaild.relay.dns import LoopbackDNS
from testing.mails import encrypted_message

BURST = 200
SINGLE = 40
COMPONENTS = ("postfix", "dovecot", "doveauth", "filtermail", "newemail")
UNLIMITED = {"max_user_send_per_minute": 10**6, "max_user_send_burst_size": 10**6}


def delivered(relay: Relay, addr: str) -> int:
    home = Path(relay.config.mailboxes_dir) / addr
    return sum(len(os.listdir(home / sub)) for sub in ("new", "cur") if (home / sub).is_dir())


def wait_count(relay: Relay, addr: str, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while delivered(relay, addr) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{delivered(relay, addr)} of {n} delivered")
        time.sleep(0.005)


def run(send_https: bool) -> tuple[float, list[float]]:
    d = state_dir()
    dns = LoopbackDNS().start()  # the DKIM keys the incoming filters check
    common = {"dns_resolver": dns.address, **UNLIMITED}
    a = Relay(d / "a", {"mxdeliv_send": send_https, **common}, components=COMPONENTS)
    b = Relay(d / "b", {"mail_domain": "other.example", **common}, components=COMPONENTS)
    try:
        a.start()
        b.start()
        for relay in (a, b):
            dns.set_txt(*relay.dkim_record())
        a.add_peer(b)
        b.add_peer(a)
        sender, password = a.new_credentials()
        a.imap(sender, password).logout()
        rcpt, rpw = b.new_credentials()
        b.imap(rcpt, rpw).logout()
        body = encrypted_message(sender, [rcpt])
        smtp = smtplib.SMTP_SSL(
            "127.0.0.1", a.config.submissions_port, context=client_tls_context(), timeout=60
        )
        smtp.login(sender, password)
        # warm-up: the first delivery opens connections, DKIM lookups
        smtp.sendmail(sender, [rcpt], body)
        wait_count(b, rcpt, 1)
        latencies = []
        for i in range(SINGLE):
            t0 = time.monotonic()
            smtp.sendmail(sender, [rcpt], body)
            wait_count(b, rcpt, 2 + i)
            latencies.append((time.monotonic() - t0) * 1000)
        base = delivered(b, rcpt)
        t0 = time.monotonic()
        for _ in range(BURST):
            smtp.sendmail(sender, [rcpt], body)
        try:
            wait_count(b, rcpt, base + BURST, timeout=120)
        except RuntimeError:
            lines = (a.log_dir / "filtermail.log").read_text().splitlines()
            print("\n".join(line for line in lines if "transport" in line and "sent" not in line))
            raise
        rate = BURST / (time.monotonic() - t0)
        smtp.quit()
        return rate, latencies
    finally:
        a.stop()
        b.stop()
        dns.stop()
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    if os.geteuid() != 0:
        print("bench_mxdeliv: needs root (starts Postfix and Dovecot)")
        return
    results = {way: run(way == "https") for way in ("https", "port 25")}
    for way, (rate, _) in results.items():
        print(f"relay to relay over {way}: {rate:.0f} msgs/s ({BURST} submitted back to back)")
    for p in (50, 90, 99):
        figures = ", ".join(f"{way} {pct(lat, p):.1f} ms" for way, (_, lat) in results.items())
        print(f"relay to relay submit -> peer's Maildir p{p} ({SINGLE} msgs): {figures}")
    print(
        "relay to relay median: "
        + ", ".join(f"{w} {statistics.median(lat):.1f} ms" for w, (_, lat) in results.items())
    )
