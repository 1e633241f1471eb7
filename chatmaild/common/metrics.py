"""Counters and histograms of every chatmaild process, for chatmail-metrics.

Taken where the events happen.  With ``metrics_address`` set, :func:`configure`
puts each process's values in a file of ``metrics_dir`` named after the program
(prometheus_client's multiprocess format, written through the library's own
mmap_dict module, one file per program instead of per pid): a restarted daemon
opens its file again and counts on, so counters survive restarts and reboots;
chatmail-metrics adds the files up for a scrape.
Without ``metrics_address`` (the default) nothing is imported or counted: a
metric is a no-op, and metrics cost no memory.

Names and labels are a stable interface (dashboards, alerts): add, never rename.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("chatmaild.metrics")

_enabled = False
_set_up = False
_program = ""
_dir = ""
_all: list[Metric] = []
_files: dict[str, Any] = {}
_lock = threading.RLock()  # a sample's read-add-write, a file's growth (executor threads count)
_mmap: Any = None  # prometheus_client's mmap_dict module, loaded by _setup()
_timestamped = False


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


class _Sample:
    """One float of a metric (a counter's _total, a bucket, a sum) in its program's
    file, where prometheus_client's multiprocess mode keeps it."""

    __slots__ = ("_file", "_key", "_value")

    def __init__(self, file: Any, metric: str, name: str, labelnames: Sequence[str],
                 labelvalues: Sequence[str], doc: str) -> None:  # fmt: skip
        self._file = file
        self._key = _mmap.mmap_key(metric, name, list(labelnames), list(labelvalues), doc)
        found = file.read_value(self._key)  # 0.16: the value; from 0.17: (value, timestamp)
        self._value = found[0] if isinstance(found, tuple) else found

    def inc(self, amount: float) -> None:
        with _lock:
            self._value += amount
            self._write()

    def set(self, value: float) -> None:
        with _lock:
            self._value = value
            self._write()

    def _write(self) -> None:
        if _timestamped:
            self._file.write_value(self._key, self._value, 0.0)
        else:
            self._file.write_value(self._key, self._value)


class _Child:
    """A metric with its label values: what .labels() gives."""

    __slots__ = ("_bounds", "_samples")

    def __init__(self, metric: Metric, values: tuple[str, ...]) -> None:
        self._bounds = _bounds(metric) if metric.kind == "Histogram" else []
        m, names, doc = metric.name, metric.labelnames, metric.doc
        if metric.kind == "Counter":
            self._samples = [_Sample(_file("counter"), m, m + "_total", names, values, doc)]
        elif metric.kind == "Gauge":
            typ = "gauge_" + metric.kw.get("multiprocess_mode", "all")
            self._samples = [_Sample(_file(typ), m, m, names, values, doc)]
        else:  # Histogram: the sum, then a count per bucket (not cumulative, as stored)
            hist = _file("histogram")
            self._samples = [_Sample(hist, m, m + "_sum", names, values, doc)]
            for bound in self._bounds:
                le = (*values, _go_float(bound))
                self._samples.append(_Sample(hist, m, m + "_bucket", (*names, "le"), le, doc))

    def inc(self, amount: float = 1) -> None:
        self._samples[0].inc(amount)

    def set(self, value: float) -> None:
        self._samples[0].set(value)

    def observe(self, value: float) -> None:
        self._samples[0].inc(value)
        for bound, sample in zip(self._bounds, self._samples[1:], strict=True):
            if value <= bound:
                sample.inc(1)
                break


class Metric:
    """A Counter, Gauge or Histogram, counted in prometheus_client's multiprocess
    files once configure() turned metrics on; a no-op otherwise."""

    def __init__(self, kind: str, name: str, doc: str, labels: Sequence[str] = (),
                 **kw: Any) -> None:  # fmt: skip
        self.kind, self.name, self.doc, self.labelnames, self.kw = kind, name, doc, labels, kw
        self._children: dict[tuple[str, ...], _Child] = {}
        _all.append(self)

    def labels(self, *values: str) -> Any:
        if not _enabled:
            return _NOTHING
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        if (child := self._children.get(key)) is None:
            with _lock:  # a new sample may grow the file
                if not _set_up:
                    _setup()
                child = self._children.setdefault(key, _Child(self, key))
        return child

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def set(self, value: float) -> None:
        self.labels().set(value)


def enabled() -> bool:
    return _enabled


def configure(metrics_address: str, metrics_dir: str, program: str) -> bool:
    """Count into ``metrics_dir``/<type>_<program>.db from the first count on, if
    metrics are on and the directory is ours (a run by root of a vmail program would
    leave files vmail cannot open); False otherwise.  prometheus_client's mmap_dict
    module is loaded at the first count: a process that counts nothing pays nothing."""
    global _enabled, _program, _dir
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
    _dir = str(path)
    _program = program
    _enabled = True
    return True


def _setup() -> None:
    """Load prometheus_client's mmap_dict module by itself: the package's __init__
    imports its HTTP server, the email package, gzip and more, 3.8 MB of RSS in
    chatmail-dict on Debian 13, for a process that only counts.  The file format
    stays the installed library's own (0.16 and 0.21 differ), read by
    chatmail-metrics with the library's MultiProcessCollector."""
    global _set_up, _mmap, _timestamped
    import importlib.util

    spec = importlib.util.find_spec("prometheus_client")  # finds, imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("metrics_address is set, but prometheus_client is missing")
    path = os.path.join(list(spec.submodule_search_locations)[0], "mmap_dict.py")
    mspec = importlib.util.spec_from_file_location("chatmaild._prometheus_mmap_dict", path)
    assert mspec is not None and mspec.loader is not None
    _mmap = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(_mmap)
    # 0.17 added a timestamp beside each value: write_value(key, value, timestamp)
    _timestamped = _mmap.MmapedDict.write_value.__code__.co_argcount == 4
    _set_up = True


def _file(typ: str) -> Any:
    """The file of this program for samples of type ``typ`` (counter, gauge_max,
    histogram): <metrics_dir>/<typ>_<program>.db, one per program, not per pid,
    so a restarted daemon counts on where it stopped."""
    if typ not in _files:
        _files[typ] = _mmap.MmapedDict(os.path.join(_dir, f"{typ}_{_program}.db"))
    return _files[typ]


def _bounds(histogram: Metric) -> list[float]:
    """A histogram's bucket bounds, +Inf last (the library adds it when missing)."""
    bounds = [float(b) for b in histogram.kw["buckets"]]
    return bounds if bounds[-1] == math.inf else [*bounds, math.inf]


def _go_float(bound: float) -> str:
    """A bucket's le label as prometheus_client writes it (its floatToGoString)."""
    if bound == math.inf:
        return "+Inf"
    s = repr(float(bound))
    dot = s.find(".")
    if bound > 0 and dot > 6:  # Go's exponent form, as the library does
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


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
