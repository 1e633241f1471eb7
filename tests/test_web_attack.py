"""The web port cannot starve mail (issue 26): a `make run` relay attacked on its web
port while mail is submitted and delivered.

Small scale here (a few seconds per attack); ``make bench`` (bench/bench_webattack.py)
runs the issue's whole table and prints the latency and throughput figures.  What is
asserted here is what could break without any clock: no submission fails under any
attack, every message submitted is delivered, the forged Host never reaches a page,
the limits refuse what is over them, idle connections hold no TLS state, the log stays
short and the web's lines never carry a mail role's name.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from testing import mails, webattack
from testing.webattack import MailProbe

pytestmark = [pytest.mark.relay, pytest.mark.timeout(600)]
COMPONENTS = ("postfix", "dovecot", "doveauth", "filtermail", "newemail")
UNLIMITED = {"max_user_send_per_minute": 10**6, "max_user_send_burst_size": 10**6}
SECONDS = 3.0


def attack(relay, kind: str, seconds: float = SECONDS, **options: object):
    return webattack.start(webattack.command(kind, relay.ports["newemail"], seconds, **options))


result = webattack.finish


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def delivered(relay, addr: str) -> int:
    new = Path(relay.config.mailboxes_dir) / addr / "new"
    cur = Path(relay.config.mailboxes_dir) / addr / "cur"
    return sum(len(list(d.iterdir())) for d in (new, cur) if d.is_dir())


@pytest.fixture(scope="module")
def attacked(relay_factory_module):
    relay = relay_factory_module(UNLIMITED, components=COMPONENTS)
    sender, recipient = relay.new_credentials(), relay.new_credentials()
    relay.imap(*recipient).logout()  # both accounts exist before the clock runs
    relay.imap(*sender).logout()
    probe = MailProbe(relay, sender, recipient[0], lambda s, r: mails.encrypted_message(s, [r]))
    return relay, probe


@pytest.fixture(scope="module")
def relay_factory_module():
    from tests.fixtures.relay import RelayPool

    pool = RelayPool()
    yield pool
    pool.close()


@pytest.mark.parametrize("kind", ["forged-host", "long-host", "handshakes"])
def test_mail_flows_while_the_web_port_is_attacked(attacked, kind):
    relay, probe = attacked
    before = delivered(relay, probe.recipient)
    attacker = attack(relay, kind, connections=20)
    time.sleep(0.5)  # the attack is under way
    mail = probe.latency(SECONDS - 1)
    counts = result(attacker)
    print(f"{kind}: {counts}; mail {mail}")
    assert mail["failures"] == [] and mail["count"] > 0
    deadline = time.monotonic() + 30
    while delivered(relay, probe.recipient) < before + mail["count"]:
        assert time.monotonic() < deadline, "submitted mail not delivered"
        time.sleep(0.1)
    if kind == "forged-host":
        assert counts["status 200"] > 0  # the pages were served all along
    elif kind == "long-host":
        assert counts["status 400"] > 0 and "status 200" not in counts
    else:
        # 20 workers from one address: the per-client handshake rate refuses most
        assert (
            counts.get("answered", 0) > 0 and counts.get("reset", 0) + counts.get("closed", 0) > 0
        )


def test_pages_never_name_a_forged_host(attacked):
    relay, _ = attacked
    import http.client

    from chatmaild.relay import client_tls_context

    port = relay.ports["newemail"]
    for path in ("/", "/invite.svg", "/new"):
        # from an address of its own: 127.0.0.1's handshake budget is the attackers'
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, context=client_tls_context(), source_address=("127.0.0.99", 0)
        )
        conn.request("GET", path, headers={"Host": "127.0.0.1:9999evil"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert b"evil" not in body and "evil" not in response.getheader("Location", "")
        assert f"127.0.0.1:{port}".encode() in body + response.getheader("Location", "").encode()


def test_idle_connections_are_bounded_per_client_and_hold_no_tls_state(attacked):
    relay, _ = attacked
    pid = relay.pid_of("newemail")
    assert pid is not None
    before = rss_kb(pid)
    # 64 from one address: the first 32 (web_max_connections_per_ip) are held
    one = result(attack(relay, "idle", seconds=1, connections=64, sources=1))
    assert one["opened"] == 64  # the kernel accepts; the server resets what is over
    assert one["closed by the server"] >= 32 and one["still open"] <= 32
    # 600 silent connections from 30 addresses, 20 each: all held, little memory
    proc = attack(relay, "idle", seconds=2, connections=600, sources=30)
    held = json.loads(proc.stdout.readline())
    assert held["open"] == 600
    during = rss_kb(pid)
    counts = result(proc)
    assert counts["still open"] == 600
    per_connection = (during - before) * 1024 / 600
    print(f"idle: RSS {before} -> {during} kB, {per_connection:.0f} bytes per connection")
    # no TLS state before the first byte: far below a TLS connection's ~100 kB
    assert per_connection < 20 * 1024


def test_logs_stay_short_and_apart(attacked):
    relay, _ = attacked
    logs = relay.log_dir
    web = (logs / "newemail.log").read_text(errors="replace")
    mail = (logs / "filtermail.log").read_text(errors="replace")
    assert "Traceback" not in web and "Task exception" not in web
    # refusals: a first line, then summaries; never one line per refusal
    refusals = [line for line in web.splitlines() if "too many" in line or "too fast" in line]
    assert refusals and len(refusals) < 20, refusals
    # nothing of the web under the mail roles' names, and no web in their process
    assert "chatmail-newemail" not in mail and "issued credentials" not in mail


def test_mail_comes_first_when_the_cpu_is_short(attacked):
    """The web process runs niced (its unit: Nice=10, CPUWeight=20), the filters not."""
    relay, _ = attacked

    def nice(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

    web, filters = relay.pid_of("newemail"), relay.pid_of("filtermail")
    assert web is not None and filters is not None
    base = os.getpriority(os.PRIO_PROCESS, 0)  # a suite run under nice passes it on
    assert nice(filters) == base and nice(web) == min(base + 10, 19)

    # each daemon has a session of its own, and the kernel shares the CPU between
    # sessions (autogroups) before nice counts: the web session's share is lowered too
    def session_nice(pid: int) -> int | None:
        path = Path(f"/proc/{pid}/autogroup")
        return int(path.read_text().split()[-1]) if path.exists() else None

    if session_nice(filters) is not None:
        assert session_nice(web) == 10 and session_nice(filters) == 0
