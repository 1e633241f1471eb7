"""What a scrape shows: the daemons' counters and gauges (their files in
``metrics_dir``) and figures read at the scrape (Postfix's queue, the
certificate, whether registration is open).

Pure text building here; ``main`` runs the commands and serves it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class ShowqTally:
    """Messages per queue and the oldest arrival in what Postfix's showq service
    sends (what ``postqueue -j`` reads), fed piece by piece: memory stays that of
    one piece however long the queue.

    The stream: records of NUL-terminated name and value, each record ended by an
    empty name, the list by an empty record; the first record names the protocol,
    a message's repeats ``recipient``/``reason`` per recipient."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.oldest: float | None = None
        self.done = False
        self._rest = b""
        self._name: str | None = None  # a name whose value is still to come
        self._fields = 0  # of the current record
        self._queue = ""

    def feed(self, data: bytes) -> None:
        tokens = (self._rest + data).split(b"\0")
        self._rest = tokens.pop()  # unterminated: the next piece completes it
        if len(self._rest) > 65536:
            raise ValueError("showq: a field longer than 64 KiB")
        for token in tokens:
            if self.done:
                return
            if self._name is None:
                if token:
                    self._name = token.decode("ascii", "replace")
                    continue
                self._end_record()
                continue
            name, self._name = self._name, None
            self._fields += 1
            if name == "queue_name":
                self._queue = token.decode("ascii", "replace")
            elif name == "time" and token.isdigit():
                when = float(token)
                self.oldest = when if self.oldest is None else min(self.oldest, when)

    def _end_record(self) -> None:
        if self._fields == 0:
            self.done = True  # the empty record: the end of the list
            return
        if self._queue:
            self.counts[self._queue] += 1
        self._fields, self._queue = 0, ""


def parse_showq(data: bytes) -> ShowqTally:
    tally = ShowqTally()
    tally.feed(data)
    if not tally.done:
        raise ValueError("showq: the list did not end")
    return tally


def counters_text(metrics_dir: str) -> str:
    """Every program's counters and histograms, added up (prometheus_client's
    multiprocess collector reads the files)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return generate_latest(registry).decode()


def gauge(name: str, doc: str, samples: Iterable[tuple[dict[str, str], float]]) -> str:
    lines = [f"# HELP {name} {doc}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")
    return "\n".join(lines) + "\n"


def queue_text(tally: ShowqTally, now: float | None = None) -> str:
    """Postfix's queue: messages per queue, the age of the oldest."""
    now = time.time() if now is None else now
    oldest = tally.oldest if tally.oldest is not None else now
    return gauge(
        "chatmail_postfix_queue_messages",
        "messages in Postfix's queue, by queue",
        [({"queue": q}, tally.counts.get(q, 0)) for q in QUEUES],
    ) + gauge(
        "chatmail_postfix_queue_oldest_seconds",
        "age of the oldest message in Postfix's queue (0: empty)",
        [({}, round(max(0.0, now - oldest), 1))],
    )


def certificate_text(not_after: float | None) -> str:
    samples = [] if not_after is None else [({}, not_after)]
    return gauge(
        "chatmail_certificate_expiry_timestamp_seconds",
        "when the relay's TLS certificate expires (Unix time)",
        samples,
    )


def registration_text(registration_open: bool) -> str:
    return gauge(
        "chatmail_registration_open",
        "1 while first logins may create accounts (no nocreate_file)",
        [({}, int(registration_open))],
    )


def http_body(answer: bytes) -> str:
    """The body of an HTTP/1.x 200 answer read to its end (Connection: close)."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if not sep or len(status) < 2 or not status[0].startswith(b"HTTP/1."):
        raise ValueError("not an HTTP answer")
    if status[1] != b"200":
        raise ValueError(f"HTTP status {status[1].decode('latin-1')!r}")
    if b"transfer-encoding: chunked" in head.lower():
        raise ValueError("chunked answer")  # Dovecot sends Content-Length
    return body.decode("utf-8", "replace")


def dovecot_text(openmetrics: str) -> str:
    """Dovecot's OpenMetrics made Prometheus text (version 0.0.4), as the rest of
    /metrics is: a counter family is named as its ``_total`` samples, an info
    family as its ``_info`` gauge, and every name starts with ``dovecot_`` (its
    stats process's own process_start_time_seconds too); UNIT lines and ``# EOF`` go."""
    lines = [x for x in openmetrics.splitlines()
             if x and x != "# EOF" and not x.startswith("# UNIT ")]  # fmt: skip
    family: dict[str, str] = {}  # OpenMetrics family -> its name here
    kinds: dict[str, str] = {}
    for line in lines:
        if line.startswith("# TYPE "):
            _, _, name, kind = (line.split(" ", 3) + [""])[:4]
            new = name if name.startswith("dovecot_") else "dovecot_" + name
            if kind == "counter" and not new.endswith("_total"):
                new += "_total"
            elif kind == "info":
                new, kind = new + "_info", "gauge"
            family[name], kinds[name] = new, kind
    out: list[str] = []
    for line in lines:
        if line.startswith(("# TYPE ", "# HELP ")):
            _, what, name, rest = (line.split(" ", 3) + [""])[:4]
            if what == "TYPE":
                rest = kinds.get(name, rest)
            out.append(f"# {what} {family.get(name, name)} {rest}".rstrip())
        elif not line.startswith("#"):
            out.append(line if line.startswith("dovecot_") else "dovecot_" + line)
    return "\n".join(out) + "\n" if out else ""
