"""Metrics (issue 23): chatmail-metrics scraped by Debian's real Prometheus.

A relay with every daemon and metrics on (filtermail serves /metrics, the
role chatmail-metrics); the test starts Prometheus
(its own config, storage and port) scraping it every second.  After an
encrypted mail, a refused cleartext one, a new account and a push token,
PromQL through Prometheus's HTTP API returns each count; filtermail killed
and started again is scraped again, its counts kept.
"""

from __future__ import annotations

import imaplib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from chatmaild.common.config import ConfigError, parse_params
from chatmaild.exporter import collect
from chatmaild.relay.ports import free_ports
from testing.mails import encrypted_message, plain_message
from testing.processes import stop_group
from tests.fixtures.relay import FULL, RelayPool

PROMETHEUS = "/usr/bin/prometheus"
imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))


# ---------------------------------------------------------------- pure


# what Postfix 3.7's showq sent for one deferred message (captured from make run)
SHOWQ = (b"protocol\x00mail_queue_list_protocol\x00\x00queue_name\x00deferred\x00queue_id"
         b"\x00A42A6334762\x00time\x001796576822\x00size\x004385\x00forced_expire\x000\x00"
         b"sender\x00a@chat.example\x00recipient\x00a@chat.example\x00reason\x00connect to"
         b" chat.example[private/dovecot-lmtp]: Connection refused\x00\x00\x00")  # fmt: skip


def test_showq_tally_and_queue_text():
    tally = collect.parse_showq(SHOWQ)
    assert tally.counts == {"deferred": 1} and tally.oldest == 1796576822
    # piece by piece, cut anywhere: the same
    pieces = collect.ShowqTally()
    for i in range(0, len(SHOWQ), 7):
        pieces.feed(SHOWQ[i : i + 7])
    assert pieces.done and pieces.counts == tally.counts and pieces.oldest == tally.oldest
    assert not collect.parse_showq(b"protocol\x00mail_queue_list_protocol\x00\x00\x00").counts
    with pytest.raises(ValueError):
        collect.parse_showq(SHOWQ[:40])  # cut off: the list did not end
    two = (
        SHOWQ[:-1].replace(b"deferred", b"active")
        + SHOWQ[len(b"protocol\x00mail_queue_list_protocol\x00\x00") :]
    )
    text = collect.queue_text(collect.parse_showq(two), now=1796576822 + 100)
    assert 'chatmail_postfix_queue_messages{queue="deferred"} 1' in text
    assert 'chatmail_postfix_queue_messages{queue="active"} 1' in text
    assert 'chatmail_postfix_queue_messages{queue="hold"} 0' in text
    assert "chatmail_postfix_queue_oldest_seconds 100.0" in text
    assert "chatmail_postfix_queue_oldest_seconds 0.0" in collect.queue_text(
        collect.ShowqTally(), now=5
    )


# what Dovecot 2.3.19's stats service answered (captured from make run), shortened
DOVECOT_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0;"
    b" charset=utf-8\r\nContent-Length: 600\r\n\r\n"
    b"# HELP process_start_time_seconds Timestamp of service start\n"
    b"# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 1796598030\n"
    b"# HELP dovecot_build Dovecot build information\n# TYPE dovecot_build info\n"
    b'dovecot_build_info{version="2.3.19.1",revision="9b53102964"} 1\n'
    b"# HELP dovecot_auth_success Total number of all events of this kind\n"
    b"# TYPE dovecot_auth_success counter\ndovecot_auth_success_total 2\n"
    b"# HELP dovecot_mail_delivery Histogram\n# TYPE dovecot_mail_delivery histogram\n"
    b'dovecot_mail_delivery_bucket{le="0.010000"} 1\n'
    b'dovecot_mail_delivery_bucket{le="+Inf"} 1\n'
    b"dovecot_mail_delivery_sum 0.002229\ndovecot_mail_delivery_count 1\n# EOF\n"
)


def test_dovecot_openmetrics_become_prometheus_text():
    from prometheus_client.parser import text_string_to_metric_families

    text = collect.dovecot_text(collect.http_body(DOVECOT_ANSWER))
    assert "# EOF" not in text and "# TYPE dovecot_auth_success_total counter" in text
    assert "# HELP dovecot_build_info Dovecot build information" in text
    assert "# TYPE dovecot_build_info gauge" in text
    assert "\ndovecot_process_start_time_seconds 1796598030\n" in text
    # the Prometheus text parser takes it: each family with its samples
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["dovecot_auth_success"].type == "counter"
    assert families["dovecot_auth_success"].samples[0].value == 2
    assert families["dovecot_mail_delivery"].type == "histogram"
    assert families["dovecot_build_info"].samples[0].labels["version"] == "2.3.19.1"
    for bad in (b"HTTP/1.1 404 Not Found\r\n\r\nno", b"garbage", b"HTTP/1.1 200 OK\r\n"):
        with pytest.raises(ValueError):
            collect.http_body(bad)
    assert collect.dovecot_text("# EOF\n") == ""


def test_metrics_address_is_checked_and_mtail_address_still_works():
    assert parse_params({"mail_domain": "x.org", "mtail_address": "127.0.0.1:9390"}
                        ).metrics_address == "127.0.0.1:9390"  # fmt: skip
    both = {"mail_domain": "x.org", "mtail_address": "127.0.0.1:1", "metrics_address": "[::1]:2"}
    assert parse_params(both).metrics_address == "[::1]:2"
    with pytest.raises(ConfigError, match="metrics_address"):
        parse_params({"mail_domain": "x.org", "metrics_address": "localhost"})
    with pytest.raises(ConfigError, match="mtail_address"):
        parse_params({"mail_domain": "x.org", "mtail_address": "9390"})


# ---------------------------------------------------------------- the real thing


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_ports(1)[0]
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: chatmail\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=self.log, start_new_session=True,
        )  # fmt: skip

    def query(self, promql: str) -> float | None:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            data = json.load(r)
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, check, timeout: float = 60.0) -> float:
        until = time.monotonic() + timeout
        value = None
        while time.monotonic() < until:
            assert self.proc.poll() is None, "prometheus exited"
            try:
                value = self.query(promql)
            except OSError:
                value = None
            if value is not None and check(value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"{promql}: {value} after {timeout} s")

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def relay():
    pool = RelayPool()
    try:
        yield pool(components=(*FULL, "metrics"))  # filtermail serves /metrics
    finally:
        pool.close()


@pytest.fixture(scope="module")
def prometheus(relay):
    p = Prometheus(relay.state_dir.parent / f"prometheus-{os.getpid()}",
                   relay.config.metrics_address)  # fmt: skip
    try:
        p.wait_for('up{job="chatmail"}', lambda v: v == 1)
        yield p
    finally:
        p.stop()


@pytest.mark.relay
@pytest.mark.timeout(300)
def test_prometheus_counts_mail_accounts_and_tokens(relay, prometheus):
    sender, password = relay.new_credentials()
    rcpt, rcpt_password = relay.new_credentials()
    conn = relay.imap(rcpt, rcpt_password)  # the first login creates the account
    typ, data = conn._simple_command("SETMETADATA", "INBOX", '(/private/devicetoken "tok-1")')
    assert typ == "OK", data
    conn.logout()
    # a peer whose port is closed: its mail waits in the deferred queue
    relay.add_peer("closed.example", port=free_ports(1)[0], https_port=free_ports(1)[0])
    with relay.smtp(sender, password) as smtp:
        smtp.sendmail(sender, [rcpt], encrypted_message(sender, [rcpt]))
        with pytest.raises(Exception, match="523"):
            smtp.sendmail(sender, [rcpt], plain_message(sender, [rcpt]))
        far = "someone@closed.example"
        smtp.sendmail(sender, [far], encrypted_message(sender, [far]))
    q = prometheus.wait_for
    out = 'chatmail_filter_replies_total{direction="outgoing",stage="data",code="%s"}'
    assert q(out % "250", lambda v: v >= 1) >= 1
    assert q(out % "523", lambda v: v >= 1) >= 1
    q('chatmail_filter_seconds_count{direction="outgoing"}', lambda v: v >= 2)
    q("chatmail_accounts_created_total", lambda v: v >= 2)  # sender and recipient
    q("chatmail_push_tokens_registered_total", lambda v: v >= 1)
    q("chatmail_logins_total", lambda v: v >= 1)
    # figures read at the scrape
    q("chatmail_accounts", lambda v: v >= 2)
    q("chatmail_registration_open", lambda v: v == 1)
    q("chatmail_certificate_expiry_timestamp_seconds", lambda v: v > time.time())
    q('chatmail_postfix_queue_messages{queue="deferred"}', lambda v: v >= 1)
    q('chatmail_remote_deliveries_total{result="deferred"}', lambda v: v >= 1)
    # Dovecot's own, from its stats service: the logins, the command, the delivery
    q("dovecot_auth_success_total", lambda v: v >= 1)
    q('dovecot_imap_command_total{cmd_name="SETMETADATA",tagged_reply_state="OK"}',
      lambda v: v >= 1)  # fmt: skip
    q("dovecot_mail_delivery_count", lambda v: v >= 1)
    q('dovecot_mail_delivery_bucket{le="+Inf"}', lambda v: v >= 1)
    with pytest.raises(imaplib.IMAP4.error):
        relay.imap(rcpt, "wrong password, long enough")
    q("dovecot_auth_failure_total", lambda v: v >= 1)


@pytest.mark.relay
@pytest.mark.timeout(300)
def test_counts_survive_a_killed_daemon(relay, prometheus):
    query = 'sum(chatmail_filter_replies_total{direction="outgoing"})'
    before = prometheus.wait_for(query, lambda v: v >= 1)
    pid = relay.pid_of("filtermail")
    os.kill(pid, signal.SIGKILL)
    relay.proc_of("filtermail").wait(10)
    relay.spawn("filtermail")
    sender, password = relay.new_credentials()
    deadline = time.monotonic() + 30
    while True:  # filtermail listens again
        try:
            with relay.smtp(sender, password) as smtp:
                smtp.sendmail(sender, [sender], encrypted_message(sender, [sender]))
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    # counted on from where it stopped, not from zero
    prometheus.wait_for(query, lambda v: v >= before + 1)


# the same counts, by chatmaild's writer and by prometheus_client's own classes
COUNTING = """
import sys
from chatmaild.common import metrics as m
if sys.argv[2] == "library":  # the library's multiprocess mode, one file per program
    import prometheus_client as pc
    from prometheus_client import values
    values.ValueClass = values.MultiProcessValue(lambda: "prog")
    made = {}
    def get(metric):
        cls = getattr(pc, metric.kind)
        if metric.name not in made:
            made[metric.name] = cls(metric.name, metric.doc, metric.labelnames, registry=None,
                                    **metric.kw)
        return made[metric.name]
    replies, seconds = get(m.FILTER_REPLIES), get(m.FILTER_SECONDS)
    accounts, logins = get(m.ACCOUNTS), get(m.LOGINS)
else:
    assert m.configure("127.0.0.1:9", sys.argv[1], "prog")
    replies, seconds, accounts, logins = m.FILTER_REPLIES, m.FILTER_SECONDS, m.ACCOUNTS, m.LOGINS
for _ in range(3):
    replies.labels("outgoing", "data", "250").inc()
replies.labels("incoming", "rcpt", "550").inc()
for value in (0.001, 0.02, 0.02, 2.5, 99.0):  # on a bound, between, past the last
    seconds.labels("outgoing").observe(value)
accounts.set(7)
accounts.inc()
logins.inc(2)
print("prometheus_client" in sys.modules)
"""


def test_counts_are_written_as_prometheus_client_writes_them(tmp_path):
    """chatmaild's counting processes write the library's multiprocess files
    through its mmap_dict module alone (the package costs 3.8 MB of RSS on Debian
    13): the library's collector reads the same scrape from them as from the files
    its own Counter, Gauge and Histogram write; a second run counts on."""
    texts = {}
    for who in ("chatmaild", "library"):
        where = tmp_path / who
        where.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(where)}
        for _ in range(2):  # a restarted daemon opens its files again
            out = subprocess.run(
                [sys.executable, "-c", COUNTING, str(where), who],
                cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True,
                check=True,
            ).stdout  # fmt: skip
            assert out.strip() == ("True" if who == "library" else "False")
        assert sorted(os.listdir(where)) == ["counter_prog.db", "gauge_max_prog.db",
                                             "histogram_prog.db"]  # fmt: skip
        texts[who] = collect.counters_text(str(where))
    # the same lines; the families' order is the order of their first count
    assert sorted(texts["chatmaild"].splitlines()) == sorted(texts["library"].splitlines())
    replies = 'chatmail_filter_replies_total{code="250",direction="outgoing",stage="data"} 6.0'
    assert replies in texts["chatmaild"]
    assert 'chatmail_filter_seconds_bucket{direction="outgoing",le="0.025"} 6.0' in texts["library"]
    assert "chatmail_accounts 8.0" in texts["chatmaild"]


def test_the_grafana_dashboard_names_only_metrics_that_exist():
    """doc/grafana-chatmail.json (in /usr/share/doc/chatmaild/): valid JSON, and each
    series its queries name is one chatmaild exports."""
    import re

    from chatmaild.common import metrics

    dashboard = json.loads((Path(__file__).parents[1] / "doc/grafana-chatmail.json").read_text())
    exported = set()
    suffixes = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_count", "_sum")}
    for m in metrics._all:
        exported |= {m.name + s for s in suffixes[m.kind]}
    text = (collect.queue_text(collect.ShowqTally()) + collect.certificate_text(0)
            + collect.registration_text(True))  # fmt: skip
    exported |= set(re.findall(r"^# TYPE (\S+)", text, re.M))
    from chatmaild.relay.render import DOVECOT_METRICS  # Dovecot's, as its stats name them

    for name, _, group_by in DOVECOT_METRICS:
        if "duration" in group_by:  # a histogram
            exported |= {f"dovecot_{name}{s}" for s in ("_bucket", "_count", "_sum")}
        else:
            exported |= {f"dovecot_{name}_total", f"dovecot_{name}_duration_seconds_total"}
    named = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            named |= set(re.findall(r"\b((?:chatmail|dovecot)_[a-z_]+)", target["expr"]))
    assert any(n.startswith("dovecot_") for n in named)
    assert named and named <= exported, named - exported


@pytest.mark.relay
def test_the_endpoint_answers_only_metrics(relay):
    host, _, port = relay.config.metrics_address.rpartition(":")
    for request, status in ((b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
                            (b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
                            (b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"405")):  # fmt: skip
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(request)
            answer = b""
            while piece := s.recv(65536):
                answer += piece
        assert answer.split(b" ", 2)[1] == status, answer[:200]
        if status == b"200":
            assert b"chatmail_postfix_queue_messages" in answer
            assert b"\ndovecot_build_info{" in answer
    # Dovecot's stats socket: vmail's alone (it runs filtermail, which asks it)
    info = os.stat(relay.state_dir / "dovecot/run/http")
    assert info.st_mode & 0o777 == 0o600
    assert info.st_uid == pwd.getpwnam(relay.config.vmail_user).pw_uid
