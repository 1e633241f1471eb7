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
