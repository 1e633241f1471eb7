"""Per-sender send rate limit: GCRA (generic cell rate algorithm).

Each key has one number, its theoretical arrival time (TAT).  A send at time
``now`` is allowed if ``TAT - now <= burst_tolerance``; it then advances the
TAT by one emission interval.  So ``burst`` messages can go back to back and
afterwards one per ``60 / per_minute`` seconds, with O(1) memory per active
sender and no timestamp lists.  Uses the monotonic clock, so wall-clock jumps
neither unlock nor block anybody.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        per_minute: int,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1 or burst < 1:
            raise ValueError("per_minute and burst must be at least 1")
        self.interval = 60.0 / per_minute
        self.tolerance = self.interval * (burst - 1)
        self.clock = clock
        self._tat: dict[str, float] = {}
        self._next_gc = 0.0

    def check(self, key: str) -> float:
        """Count one send for ``key``; return 0 if allowed, else seconds until it would be."""
        now = self.clock()
        tat = max(self._tat.get(key, now), now)
        wait = tat - now - self.tolerance
        if wait > 0:
            return wait
        self._tat[key] = tat + self.interval
        if now >= self._next_gc:
            self._gc(now)
        return 0.0

    def _gc(self, now: float) -> None:
        # a key whose TAT has passed is indistinguishable from a fresh one: drop it
        self._tat = {k: t for k, t in self._tat.items() if t > now}
        self._next_gc = now + 60.0

    def __len__(self) -> int:
        return len(self._tat)
