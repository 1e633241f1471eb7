"""What a scrape shows: the daemons' counters (their files in ``metrics_dir``)
and figures read at the scrape (Postfix's queue, the certificate, accounts).

Pure text building here; ``main`` runs the commands and serves it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


def parse_showq(data: bytes) -> list[dict[str, str]]:
    """The messages in what Postfix's showq service sends (what ``postqueue -j``
    reads): records of NUL-terminated name/value pairs, each record ended by an
    empty name, the list by an empty record; the first record names the protocol.
    A message record's recipients repeat ``recipient``/``reason``: the last is kept."""
    fields = data.split(b"\0")
    records: list[dict[str, str]] = []
    record: dict[str, str] = {}
    i = 0
    while i < len(fields):
        name = fields[i].decode("utf-8", "replace")
        if not name:
            if not record:
                break  # the empty record: the end of the list
            records.append(record)
            record = {}
            i += 1
            continue
        if i + 1 >= len(fields):
            raise ValueError("showq: a name without its value")
        record[name] = fields[i + 1].decode("utf-8", "replace")
        i += 2
    if records and "protocol" in records[0]:
        records = records[1:]
    return [r for r in records if "queue_name" in r]


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


def queue_text(entries: list[dict], now: float | None = None) -> str:
    """Postfix's queue (:func:`parse_showq`'s records): messages per queue, the age of
    the oldest."""
    now = time.time() if now is None else now
    counts = Counter(e.get("queue_name", "?") for e in entries)
    oldest = min((float(e.get("time", now)) for e in entries), default=now)
    return gauge(
        "chatmail_postfix_queue_messages",
        "messages in Postfix's queue, by queue",
        [({"queue": q}, counts.get(q, 0)) for q in QUEUES],
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


def accounts_text(count: int, registration_open: bool) -> str:
    return gauge("chatmail_accounts", "accounts (mailboxes)", [({}, count)]) + gauge(
        "chatmail_registration_open",
        "1 while first logins may create accounts (no nocreate_file)",
        [({}, int(registration_open))],
    )
