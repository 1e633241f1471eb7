"""Counters and histograms of every chatmaild process, for chatmail-metrics.

Taken where the events happen.  With ``metrics_address`` set, :func:`configure`
puts each process's values in a file of ``metrics_dir`` named after the program
(prometheus_client's multiprocess mode, one identifier per program instead of
per pid): a restarted daemon opens its file again and counts on, so counters
survive restarts and reboots; chatmail-metrics adds the files up for a scrape.
Without ``metrics_address`` (the default) nothing is imported or counted: a
metric is a no-op, and metrics cost no memory.

Names and labels are a stable interface (dashboards, alerts): add, never rename.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("chatmaild.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
_enabled = False
_set_up = False
_program = ""
_all: list[Metric] = []


class _Nothing:
    """What a metric is while metrics are off."""

    def labels(self, *values: str) -> _Nothing:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


_NOTHING = _Nothing()


class Metric:
    """A prometheus_client Counter or Histogram made on first use, after configure()."""

    def __init__(self, kind: str, name: str, doc: str, labels: Sequence[str] = (),
                 **kw: Any) -> None:  # fmt: skip
        self.kind, self.name, self.doc, self.labelnames, self.kw = kind, name, doc, labels, kw
        self._metric: Any = None
        _all.append(self)

    def _get(self) -> Any:
        if not _enabled:
            return _NOTHING
        if self._metric is None:
            if not _set_up:
                _setup()
            import prometheus_client

            cls = getattr(prometheus_client, self.kind)
            self._metric = cls(self.name, self.doc, self.labelnames, registry=None, **self.kw)
        return self._metric

    def labels(self, *values: str) -> Any:
        return self._get().labels(*values)

    def inc(self, amount: float = 1) -> None:
        self._get().inc(amount)

    def observe(self, value: float) -> None:
        self._get().observe(value)

    def set(self, value: float) -> None:
        self._get().set(value)


def enabled() -> bool:
    return _enabled


def configure(metrics_address: str, metrics_dir: str, program: str) -> bool:
    """Count into ``metrics_dir``/<type>_<program>.db from the first count on, if
    metrics are on and the directory is ours (a run by root of a vmail program would
    leave files vmail cannot open); False otherwise.  prometheus_client is imported
    at the first count: a process that counts nothing pays nothing."""
    global _enabled, _program
    if not metrics_address:
        return False
    path = Path(metrics_dir)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid != os.geteuid():
            log.info("metrics_dir %s is not this user's: %s counts nothing", path, program)
            return False
    except OSError as e:
        log.warning("metrics_dir %s is not usable (%s): %s counts nothing", path, e, program)
        return False
    os.environ[ENV] = str(path)
    _program = program
    _enabled = True
    return True


def _setup() -> None:
    global _set_up
    from prometheus_client import values

    # one file per program, not per pid: a restart counts on where it stopped
    values.ValueClass = values.MultiProcessValue(lambda: _program)
    _set_up = True


@contextlib.contextmanager
def timed(histogram: Metric, *labels: str) -> Iterator[None]:
    import time

    start = time.monotonic()
    try:
        yield
    finally:
        if _enabled:
            target = histogram.labels(*labels) if labels else histogram
            target.observe(time.monotonic() - start)


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> Metric:
    return Metric("Counter", name, doc, labels)


# -- mail (filtermail)
FILTER_REPLIES = _counter(
    "chatmail_filter_replies",
    "SMTP replies of the filters that end a message (stage data) or refuse a sender or"
    " recipient (stage mail, rcpt), by direction (outgoing, incoming, transport) and code",
    ("direction", "stage", "code"),
)
FILTER_SECONDS = Metric(
    "Histogram",
    "chatmail_filter_seconds",
    "time from the end of DATA to the filter's reply, by direction",
    ("direction",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
DKIM_VERIFY = _counter(
    "chatmail_dkim_verify",
    "DKIM verification of incoming mail by result (pass, fail, temperror)",
    ("result",),
)
REMOTE_DELIVERIES = _counter(
    "chatmail_remote_deliveries",
    "deliveries to other domains by result (sent, deferred, bounced) and way (https, smtp)",
    ("result", "way"),
)
# -- accounts and logins (chatmail-dict)
ACCOUNTS = Metric(
    "Gauge",
    "chatmail_accounts",
    "accounts (mailboxes): counted by doveauth at its start and every 10 minutes,"
    " and one more at each creation",
    multiprocess_mode="max",
)
ACCOUNTS_CREATED = _counter("chatmail_accounts_created", "accounts created at a first login")
ACCOUNTS_REFUSED = _counter(
    "chatmail_accounts_refused",
    "first logins refused an account, by reason (the words of registration rejected:)",
    ("reason",),
)
LOGINS = _counter("chatmail_logins", "successful IMAP logins (last-login updates)")
# -- push (metadata role)
PUSH_TOKENS = _counter("chatmail_push_tokens_registered", "device tokens registered")
PUSHES = _counter(
    "chatmail_pushes",
    "push notification attempts by result: sent, failed (retried later unless past the"
    " deadline), gone (410: the token was removed), dropped (past the deadline)",
    ("result",),
)
# -- expiry
EXPIRE_REMOVED = _counter(
    "chatmail_expire_removed",
    "what chatmail-expire (and quota-expire: kind quota_messages) removed, by kind",
    ("kind",),
)
