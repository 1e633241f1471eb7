"""Idle footprint of chatmaild's daemon processes, fresh and after load (issue 11).

Figures (RSS and PSS from /proc/PID/smaps_rollup, MB = MiB):

- every daemon process of a freshly started relay with every component
  (``make run``'s and the units' layout: chatmail-dict = doveauth + lastlogin
  + metadata, filtermail = outgoing + incoming + milter + transport,
  chatmail-newemail with the iroh relay role; metrics on),
  and the total (target: total RSS <= 100 MB);
- the same after a load run through the whole path: accounts created over
  IMAP, a push token set for each (notifications go to a local HTTP sink),
  encrypted mail submitted over TLS (outgoing filter, re-injection, LMTP,
  push), IMAP logins (last-login), web pages and /new;
- filtermail alone (the same program with its three filter roles, its re-injection answered by
  a sink, DKIM keys of the sending domain from a loopback DNS server) through
  LOAD_MESSAGES messages straight on its sockets: outgoing to a local
  recipient, outgoing DKIM-signed to another domain, incoming DKIM-verified;
  RSS after each step, to show it does not grow with the message count.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import dkim as dkimpy

from bench.bench_filtermail import _drive, run_against_sink
from chatmaild.common.config import write_config
from chatmaild.filtermail.dkim import generate_key, public_value, txt_record
from chatmaild.relay.dns import LoopbackDNS
from chatmaild.relay.stack import Relay
from testing import mails
from testing.httpsink import SinkProcess

# every daemon, metrics on (the counting processes hold prometheus_client, filtermail
# serves /metrics, the web process the iroh relay): the largest footprint there is
ALL = ["postfix", "dovecot", "doveauth", "lastlogin", "metadata", "filtermail", "newemail",
       "metrics"]  # fmt: skip
# the load comes from one address: no rate limit of the relay's may slow it
UNLIMITED = {
    "max_user_send_per_minute": 10**6,
    "max_user_send_burst_size": 10**6,
    "web_handshake_rate": 10**5,
}
TARGET_TOTAL_RSS_MB = 100
ACCOUNTS = 40
SUBMISSIONS = 2000
WEB_REQUESTS = 200
LOAD_MESSAGES = int(os.environ.get("FOOTPRINT_MESSAGES", "100000"))
CONNECTIONS = 4
imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return fields["Rss"] / 1024, fields["Pss"] / 1024


def report(label: str, pids: dict[str, int]) -> tuple[float, float]:
    total_rss = total_pss = 0.0
    for name, pid in sorted(pids.items()):
        rss, pss = memory_mb(pid)
        total_rss, total_pss = total_rss + rss, total_pss + pss
        print(f"footprint_{label}_{name}: RSS {rss:.1f} MB, PSS {pss:.1f} MB", flush=True)
    print(f"footprint_{label}_processes: {len(pids)}")
    print(f"footprint_{label}_total_rss: {total_rss:.1f} MB (target <= {TARGET_TOTAL_RSS_MB})")
    print(f"footprint_{label}_total_pss: {total_pss:.1f} MB", flush=True)
    return total_rss, total_pss


def daemon_pids(relay: Relay) -> dict[str, int]:
    return {
        name: proc.pid
        for name, proc in relay._procs.items()
        if name not in ("postfix", "dovecot") and proc.poll() is None
    }


# ------------------------------------------------------------------ whole path


def _submit(relay: Relay, accounts: list[tuple[str, str]], count: int, offset: int) -> None:
    sender, password = accounts[offset % len(accounts)]
    with relay.smtp(sender, password) as smtp:
        for i in range(count):
            rcpt = accounts[(offset + i + 1) % len(accounts)][0]
            smtp.sendmail(sender, [rcpt], mails.encrypted_message(sender, [rcpt]))


def _web(relay: Relay, count: int) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    base = f"https://127.0.0.1:{relay.ports['newemail']}"
    for i in range(count):
        path = "/new" if i % 4 == 0 else ("/", "/info.html", "/invite.svg")[i % 3]
        method = "POST" if path == "/new" else "GET"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(base + path, method=method), context=ctx, timeout=10
            ) as response:
                response.read()
        except urllib.error.HTTPError:
            pass  # /new is rate-limited per IP: a 429 is an answer too


def whole_path(root: Path) -> None:
    with SinkProcess() as sink:
        overrides = {**UNLIMITED, "notification_url": sink.url}
        with Relay(root / "relay", overrides, components=ALL) as relay:
            time.sleep(2)  # let start-up work (key loading, first timers) settle
            report("idle", daemon_pids(relay))
            accounts = [relay.new_credentials() for _ in range(ACCOUNTS)]
            for n, (addr, password) in enumerate(accounts):
                conn = relay.imap(addr, password)  # creates the account (doveauth)
                typ, data = conn._simple_command(
                    "SETMETADATA", "INBOX", f'(/private/devicetoken "token{n}")'
                )
                assert typ == "OK", data
                conn.logout()
            start = time.monotonic()
            threads = [
                threading.Thread(
                    target=_submit, args=(relay, accounts, SUBMISSIONS // CONNECTIONS, k)
                )
                for k in range(CONNECTIONS)
            ]
            threads.append(threading.Thread(target=_web, args=(relay, WEB_REQUESTS)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for addr, password in accounts * 3:
                relay.imap(addr, password).logout()  # logins: doveauth passdb, lastlogin
            print(f"footprint_load_submitted: {SUBMISSIONS} messages, {ACCOUNTS} accounts, "
                  f"{WEB_REQUESTS} web requests, {3 * ACCOUNTS} logins "
                  f"in {time.monotonic() - start:.0f} s")  # fmt: skip
            sink.wait_count(SUBMISSIONS, 60)
            print(f"footprint_load_push_notifications: {sink.count()}")
            time.sleep(2)
            report("after_load", daemon_pids(relay))


# ------------------------------------------------------------------ filtermail volume


def filtermail_volume(root: Path) -> None:
    work = root / "alone"
    work.mkdir()
    key, _ = generate_key()
    (work / "dkim.key").write_bytes(key)
    peer_key, _ = generate_key()
    socks = {name: str(work / f"{name}.sock") for name in ("out", "in", "milter", "sink")}
    with LoopbackDNS() as dns_server:
        dns_server.set_txt("peer._domainkey.other.example", txt_record(public_value(peer_key)))
        ini = write_config(
            work / "chatmail.ini",
            mail_domain="chat.example",
            filtermail_smtp_socket=socks["out"],
            filtermail_smtp_socket_incoming=socks["in"],
            filtermail_milter_socket=socks["milter"],
            postfix_reinject_socket=socks["sink"],
            postfix_reinject_socket_incoming=socks["sink"],
            dns_resolver=dns_server.address,
            dkim_key_path=work / "dkim.key",
            mailboxes_dir=work / "mail",
            passdb_path=work / "passdb.sqlite",
            **UNLIMITED,
        )
        cmd = [sys.executable, "-m", "chatmaild.filtermail.main", "--config", str(ini),
               "outgoing", "incoming", "milter"]  # fmt: skip
        sender = "sender001@chat.example"
        outgoing_local = mails.encrypted_message(sender, ["rcpt001@chat.example"])
        outgoing_remote = mails.encrypted_message(sender, ["rcpt001@other.example"])
        incoming = mails.encrypted_message("alice001@other.example", ["rcpt001@chat.example"])
        signature = dkimpy.sign(
            incoming, b"peer", b"other.example", peer_key, include_headers=[b"from", b"to"]
        )
        incoming = signature + incoming
        steps = (
            ("outgoing_local", socks["out"], sender, "rcpt001@chat.example", outgoing_local),
            ("outgoing_remote_signed", socks["out"], sender, "rcpt001@other.example",
             outgoing_remote),
            ("incoming_verified", socks["in"], "alice001@other.example", "rcpt001@chat.example",
             incoming),
        )  # fmt: skip

        async def load(proc: subprocess.Popen) -> None:
            rss0, pss0 = memory_mb(proc.pid)
            print(f"filtermail_alone_idle: RSS {rss0:.1f} MB, PSS {pss0:.1f} MB", flush=True)
            done, start = 0, time.monotonic()
            rounds = 10
            samples = []
            for r in range(rounds):
                # ten rounds, each a third of every kind; RSS after each
                for k, (_, path, mail_from, rcpt, payload) in enumerate(steps):
                    share = LOAD_MESSAGES * (3 * r + k + 1) // (3 * rounds) - done
                    await _drive(path, share, mail_from, rcpt, payload)
                    done += share
                rss, pss = memory_mb(proc.pid)
                samples.append((done, rss))
                print(f"filtermail_alone_after_{done}: RSS {rss:.1f} MB, PSS {pss:.1f} MB "
                      f"({done / (time.monotonic() - start):.0f} msg/s)", flush=True)  # fmt: skip
            (first_done, first_rss), last_rss = samples[0], samples[-1][1]
            print(f"filtermail_alone_growth: {last_rss - first_rss:+.1f} MB from {first_done} "
                  f"to {done} messages ({last_rss - rss0:+.1f} MB since idle)")  # fmt: skip

        # ready once the last role listens (the milter)
        run_against_sink(cmd, work / "filtermail.log", socks["sink"], socks["milter"], load)
        if "Traceback" in (work / "filtermail.log").read_text():
            raise RuntimeError("filtermail logged a traceback: " + str(work / "filtermail.log"))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-footprint-", dir="/tmp"))
    root.chmod(0o755)
    try:
        whole_path(root)
        if LOAD_MESSAGES:
            filtermail_volume(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
