"""One log line per kind of event per minute, however many there are: the first
at once, then a count (refusals of the web port, failed push requests).

``SummaryLog(log).note(kind, who)`` logs ``<kind>: <who>`` the first time in a
window and counts the rest; ``tick()`` (called periodically) and ``flush()``
write ``<kind>: N more from M client(s) in the last 60 s``.  ``TimedSummaryLog``
ticks itself, from the running event loop, for callers with no tick of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

SUMMARY_SECONDS = 60.0


class SummaryLog:
    """Logs the first refusal of each kind at once, then at most one summary line per
    kind every ``period`` seconds: ``<kind>: N more from M clients in the last 60 s``.

    A flood of refusals costs a few lines a minute, and the counts stay exact.
    """

    def __init__(
        self, log: logging.Logger, period: float = SUMMARY_SECONDS, level: int = logging.INFO
    ) -> None:
        self.log = log
        self.period = period
        self.level = level
        self.window_start: dict[str, float] = {}
        self.suppressed: dict[str, Counter[str]] = {}

    def note(self, kind: str, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        start = self.window_start.get(kind)
        if start is None or now - start >= self.period:
            self.flush(kind)
            self.window_start[kind] = now
            self.log.log(self.level, "%s: %s", kind, client)
            return
        self.suppressed.setdefault(kind, Counter())[client] += 1

    def flush(self, kind: str | None = None) -> None:
        """Write the summary of what was held back (of one kind, or of all)."""
        for k in [kind] if kind is not None else list(self.suppressed):
            held = self.suppressed.pop(k, None)
            if held:
                self.log.log(
                    self.level,
                    "%s: %d more from %d client(s) in the last %d s",
                    k,
                    sum(held.values()),
                    len(held),
                    round(self.period),
                )

    def tick(self, now: float | None = None) -> None:
        """Close the windows that are over (called periodically)."""
        now = time.monotonic() if now is None else now
        for kind, start in list(self.window_start.items()):
            if now - start >= self.period:
                self.flush(kind)
                del self.window_start[kind]


class TimedSummaryLog(SummaryLog):
    """A SummaryLog that writes its summaries itself: while a window is open, a timer
    of the running event loop ticks it every ``period`` (a failing push service, a
    DNS outage: no other periodic work to hang the tick on)."""

    def __init__(
        self, log: logging.Logger, period: float = SUMMARY_SECONDS, level: int = logging.INFO
    ) -> None:
        super().__init__(log, period, level)
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def note(self, kind: str, client: str, now: float | None = None) -> None:
        super().note(kind, client, now)
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._summarize)

    def _summarize(self) -> None:
        self._timer = None
        self.tick()
        if self.window_start and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._summarize)

    def close(self) -> None:
        """Write what is held back; no timer stays behind."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
