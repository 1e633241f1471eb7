"""Mail under attack on the web port (issue 26): the issue's table, on a `make run` relay.

For each attack (testing/webattack.py, in a process of its own, sharing the two
cores with the relay): mail submit->250 latency over one authenticated
connection (p50, p90, max) and throughput over four connections, failed
submissions, what the attacker got, and the web process's log growth.  Then the
memory of the web process (RSS, MiB) with 3,000 idle connections, silent and
after their TLS handshake, and after they closed; then 20,000 idle connections
against the connection limits.

Targets: mail p50 <= 3 x quiet (or <= 20 ms), throughput >= 0.5 x quiet, no
failed submission; <= 20 KB per idle connection, given back after close; the
log under 1 MB per attack-minute.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from bench.proc import rss_mb
from chatmaild.relay.stack import Relay
from testing import mails, webattack
from testing.webattack import MailProbe

COMPONENTS = ["postfix", "dovecot", "doveauth", "filtermail", "newemail"]
SECONDS = 20.0
OVERRIDES = {
    "max_user_send_per_minute": 10**6,
    "max_user_send_burst_size": 10**6,
    # room for the 3,000 idle connections whose memory is measured
    "web_max_connections": 4096,
}
ATTACKS = [
    ("forged Host, 1 connection", "forged-host", {"connections": 1}),
    ("forged Host, 20 connections", "forged-host", {"connections": 20}),
    ("Host over the line limit, 20 connections", "long-host", {"connections": 20}),
    ("replayed TLS ClientHellos, 50 at a time", "handshakes", {"connections": 50}),
    (
        "replayed TLS ClientHellos from 200 addresses, 50 at a time",
        "handshakes",
        {"connections": 50, "sources": 200},
    ),
]


# WEBATTACK_NICE=19: the attacker yields the CPU to everything else, as one on another
# machine would (its own CPU is then not the relay's): what the relay itself spends
ATTACKER_NICE = os.environ.get("WEBATTACK_NICE")


def _attacker(relay: Relay, kind: str, seconds: float, **options: object) -> subprocess.Popen:
    cmd = webattack.command(kind, relay.ports["newemail"], seconds, **options)
    return webattack.start(["nice", "-n", ATTACKER_NICE, *cmd] if ATTACKER_NICE else cmd)


_finish = webattack.finish


def _mail(probe: MailProbe, seconds: float) -> tuple[dict, dict]:
    half = seconds / 2
    return probe.latency(half), probe.throughput(half)


def _row(label: str, latency: dict, throughput: dict, quiet: tuple[dict, dict] | None) -> str:
    failures = len(latency["failures"]) + len(throughput["failures"])
    text = (
        f"{label}: mail p50 {latency['p50_ms']:.1f} ms, p90 {latency['p90_ms']:.1f} ms,"
        f" max {latency['max_ms']:.1f} ms, {throughput['msg_per_s']:.0f} msg/s,"
        f" {failures} failed"
    )
    if quiet is not None:
        limit = max(3 * quiet[0]["p50_ms"], 20.0)
        ok = (
            latency["p50_ms"] <= limit
            and throughput["msg_per_s"] >= 0.5 * quiet[1]["msg_per_s"]
            and failures == 0
        )
        text += f" (target p50 <= {limit:.1f} ms, >= {0.5 * quiet[1]['msg_per_s']:.0f} msg/s:"
        text += " met)" if ok else " MISSED)"
    return text


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attackers inherit it
    with tempfile.TemporaryDirectory(prefix="bench-webattack-") as tmp:
        Path(tmp).chmod(0o755)
        with Relay(Path(tmp) / "relay", OVERRIDES, components=COMPONENTS) as relay:
            sender, recipient = relay.new_credentials(), relay.new_credentials()
            relay.imap(*sender).logout()
            relay.imap(*recipient).logout()
            probe = MailProbe(
                relay, sender, recipient[0], lambda s, r: mails.encrypted_message(s, [r])
            )
            web_log = relay.log_dir / f"{relay.process_of('newemail')}.log"
            web_pid = relay.pid_of("newemail")
            assert web_pid is not None
            probe.latency(2)  # warm up
            quiet = _mail(probe, SECONDS)
            print("webattack_" + _row("quiet", *quiet, None), flush=True)
            for label, kind, options in ATTACKS:
                log_before = web_log.stat().st_size
                proc = _attacker(relay, kind, SECONDS + 2, **options)
                time.sleep(1)
                figures = _mail(probe, SECONDS)
                counts = _finish(proc)
                log_kb = (web_log.stat().st_size - log_before) / 1024
                print("webattack_" + _row(label, *figures, quiet), flush=True)
                per_minute = log_kb * 60 / (SECONDS + 2)
                print(f"webattack_  attacker: {counts}; web log +{log_kb:.1f} kB"
                      f" ({per_minute:.0f} kB per attack-minute, target < 1024)",
                      flush=True)  # fmt: skip
            for tls in (False, True):
                what = "after their TLS handshake" if tls else "silent"
                rest = rss_mb(web_pid)
                # the server closes a silent connection after 5 s: measured before that
                proc = _attacker(relay, "idle", 4 if not tls else 8, connections=3000,
                                 sources=200, **({"tls": True} if tls else {}))  # fmt: skip
                held = json.loads(proc.stdout.readline())["open"]
                time.sleep(0.5)
                during = rss_mb(web_pid)
                latency = probe.latency(2)
                counts = _finish(proc)
                time.sleep(2)
                after = rss_mb(web_pid)  # freed heap handed back 1 s after the last close
                per_kb = (during - rest) * 1024 / max(held, 1)
                print(f"webattack_idle_{'tls' if tls else 'silent'}: {held} connections {what}:"
                      f" web RSS {rest:.1f} -> {during:.1f} MB ({per_kb:.1f} KB each, target"
                      f" <= 20), {after:.1f} MB after they closed; mail p50"
                      f" {latency['p50_ms']:.1f} ms, {len(latency['failures'])} failed; {counts}",
                      flush=True)  # fmt: skip
            crowd = min(20000, hard - 200)  # the attacker's own descriptors
            proc = _attacker(relay, "idle", 6, connections=crowd, sources=250)
            proc.stdout.readline()
            figures = _mail(probe, 4)
            counts = _finish(proc)
            print("webattack_" + _row(f"{crowd} idle connections", *figures, quiet), flush=True)
            print(f"webattack_  attacker: {counts}", flush=True)
            log_lines = web_log.read_text(errors="replace").splitlines()
            print(f"webattack_web_log: {len(log_lines)} lines in all, "
                  f"{sum(map(len, log_lines)) / 1024:.1f} kB", flush=True)  # fmt: skip
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    main()
