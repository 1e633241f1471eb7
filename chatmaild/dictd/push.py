"""Persistent push notifier: one POST of the device token per (account, token) per message.

Every notification is first written to its own file in ``notification_dir``
(``addr\\nstart_ts\\ntoken``, the reference relay's format, written as ``.tmp``
and renamed) and only then queued, so a crash or ``kill -9`` loses nothing: at
start every file is queued again.  The files are not fsynced: the message they
announce is not either (Dovecot's LMTP runs with ``mail_fsync = never``), so
an fsync would add disk latency to every delivery without making a power loss
any less lossy.  A file is deleted when the push service accepted the token
(2xx), when it answered 410 Gone (the token is then removed from the account),
or when the notification is dropped.

Scheduling is asyncio only: a retry is a loop timer, at most
``notification_concurrency`` requests run at once over one keep-alive HTTP
client.  Failures retry after 0, 8, 64, 512 and 4096 s (``notification_retry_delay``
scales the ladder); a notification that would retry a 6th time or past its
deadline (5 h after it was created, kept across restarts) is dropped with the
log line ``notification exceeded deadline``.

Per (account, token) there is one lane, and a lane has at most one request in
flight, so notifications for one device go out in order.  A successful request
satisfies every notification of its lane created before the request started
(the device wakes up and fetches all new mail), so a backlog for one device
costs one request, not one per message.  For the same reason a lane keeps at
most one notification waiting besides those in flight: a newer one replaces it
(its file too) and carries on its failures, so the retry ladder goes on, with
the newer deadline.  While the push service is down, memory and files stay one
or two per device, not one per message (an hour's soak with the service
unreachable grew the dict process by 8.6 MB before).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from chatmaild.common import metrics
from chatmaild.common.config import Config
from chatmaild.common.httppost import PostClient
from chatmaild.common.logsummary import TimedSummaryLog
from chatmaild.dictd.tokens import TokenStore

RETRY_FACTOR = 8
RETRY_LEVELS = 5  # attempts in all: delays 0, 1, 8, 64, 512 x base
DEADLINE_FACTOR = 2250  # 5 h at the default 8 s base
TMP_SUFFIX = ".tmp"

LOG_DEADLINE = "notification exceeded deadline"
LOG_FAILED = "Notification request failed"

log = logging.getLogger("chatmaild.dictd.push")


# ---------------------------------------------------------------- pure logic


def retry_delay(retries: int, base: float) -> float:
    """Seconds before the attempt that follows ``retries`` failed ones: 0, b, 8b, 64b, 512b."""
    if retries <= 0:
        return 0.0
    return base * RETRY_FACTOR ** (retries - 1)


def is_expired(retries: int, start_ts: float, now: float, base: float) -> bool:
    """True if a notification with ``retries`` failures must be dropped rather than retried."""
    if retries >= RETRY_LEVELS:
        return True
    return now + retry_delay(retries, base) > start_ts + base * DEADLINE_FACTOR


@dataclass
class Pending:
    """One persisted notification."""

    name: str  # file name in the queue directory
    addr: str
    token: str
    start_ts: float
    retries: int = 0  # failed attempts it took part in (since the last start)


def encode_pending(addr: str, start_ts: float, token: str) -> bytes:
    return f"{addr}\n{start_ts!r}\n{token}".encode()


def decode_pending(name: str, data: bytes) -> Pending:
    """Parse a queue file; ValueError if it is not ``addr\\nstart_ts\\ntoken``."""
    text = data.decode("utf-8")
    parts = text.split("\n")
    if len(parts) != 3:
        raise ValueError("expected three lines")
    addr, ts, token = parts
    if not addr or not token or "@" not in addr:
        raise ValueError("empty address or token")
    start_ts = float(ts)
    if start_ts != start_ts or start_ts < 0:  # NaN or negative
        raise ValueError("bad timestamp")
    return Pending(name, addr, token, start_ts)


# ---------------------------------------------------------------- queue directory


class QueueDir:
    """The directory of pending notifications (blocking file I/O)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def create(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def persist(self, addr: str, tokens: Iterable[str], start_ts: float) -> list[Pending]:
        """Write one file per token (atomically, by rename); returns them once all exist."""
        written: list[Pending] = []
        tmps: list[Path] = []
        try:
            for token in tokens:
                name = uuid.uuid4().hex
                tmp = self.path / (name + TMP_SUFFIX)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                tmps.append(tmp)
                try:
                    os.write(fd, encode_pending(addr, start_ts, token))
                finally:
                    os.close(fd)
                written.append(Pending(name, addr, token, start_ts))
            for pending, tmp in zip(written, tmps, strict=True):
                os.replace(tmp, self.path / pending.name)
            tmps = []
        finally:
            for tmp in tmps:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return written

    def remove(self, pending: Pending) -> None:
        # no fsync: if the unlink is lost in a crash the device is woken once more
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / pending.name)

    def load(self) -> list[Pending]:
        """Every queued notification, oldest first; removes leftovers and unreadable files."""
        found: list[Pending] = []
        with os.scandir(self.path) as it:
            names = [e.name for e in it if e.is_file(follow_symlinks=False)]
        for name in names:
            path = self.path / name
            if name.endswith(TMP_SUFFIX):
                log.info("removing spurious queue file %s", path)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            try:
                found.append(decode_pending(name, path.read_bytes()))
            except (OSError, ValueError) as e:
                log.warning("removing unreadable queue file %s: %s", path, e)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        found.sort(key=lambda p: (p.start_ts, p.name))
        return found


# ---------------------------------------------------------------- scheduler


@dataclass(eq=False)
class Lane:
    """Notifications for one (account, token), delivered strictly one request at a time."""

    addr: str
    token: str
    entries: deque[Pending] = field(default_factory=deque)
    queued: bool = False  # waiting in the ready queue, on a retry timer, or in flight
    timer: asyncio.TimerHandle | None = None
    inflight: int = 0  # the first entries, carried by the request in flight


# what the HTTP layer reports: a status code (None when no answer came) and why
PostResult = tuple[int | None, str]


class Notifier:
    """Queue, schedule and deliver push notifications."""

    def __init__(
        self,
        config: Config,
        tokens: TokenStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.clock = clock
        self.queue = QueueDir(config.notification_dir)
        self.url = config.notification_url
        self.base_delay = config.notification_retry_delay
        self.concurrency = config.notification_concurrency
        self.lanes: dict[tuple[str, str], Lane] = {}
        self._ready: asyncio.Queue[Lane] = asyncio.Queue()
        self._workers: list[asyncio.Task] = []
        self._session: PostClient | None = None
        self._inflight = 0
        self._closing = False
        # a push service that is down fails every request: one line per cause a minute
        self.failures = TimedSummaryLog(log, level=logging.WARNING)
        # counters for tests and benchmarks
        self.sent = 0
        self.failed = 0
        self.gone = 0
        self.dropped = 0
        self.replaced = 0  # waiting notifications a newer one of their lane replaced

    # -- lifecycle

    async def start(self) -> int:
        """Create the queue directory, requeue what a previous run left; returns that count."""
        await asyncio.to_thread(self.queue.create)
        recovered = await asyncio.to_thread(self.queue.load)
        for pending in recovered:
            self._enqueue(pending)
        # without an endpoint nothing is sent; queued files wait for one to be configured
        self._workers = [
            asyncio.create_task(self._worker(), name=f"notifier-{i}")
            for i in range(self.concurrency if self.url else 0)
        ]
        if recovered:
            log.info("requeued %d pending notifications", len(recovered))
        if not self.url:
            log.warning("notification_url is empty: push notifications are disabled")
        return len(recovered)

    async def stop(self, timeout: float = 5.0) -> None:
        """Let requests in flight finish (bounded), then stop; unsent files stay queued."""
        self._closing = True
        self.failures.close()
        for lane in self.lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
        deadline = asyncio.get_running_loop().time() + timeout
        while self._inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def pending_count(self) -> int:
        return sum(len(lane.entries) for lane in self.lanes.values())

    # -- entry points

    async def notify(self, addr: str) -> int:
        """A message arrived for ``addr``: persist one notification per token, then queue them.

        Returns how many were queued.  Raises (AddressError, OSError) if they
        could not be persisted; nothing is queued then.
        """
        if not self.url:
            return 0
        written = await asyncio.to_thread(self._persist_for, addr)
        for pending in written:
            self._enqueue(pending)
        return len(written)

    def _persist_for(self, addr: str) -> list[Pending]:
        # one thread hop for both file operations: this is on the LMTP delivery's path
        tokens = self.tokens.tokens(addr)
        return self.queue.persist(addr, tokens, self.clock()) if tokens else []

    def _enqueue(self, pending: Pending) -> None:
        key = (pending.addr, pending.token)
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = Lane(pending.addr, pending.token)
        if len(lane.entries) > lane.inflight:
            # the next request satisfies both: keep the newer, with the older's failures
            self._supersede(lane.entries.pop(), pending)
        lane.entries.append(pending)
        if not lane.queued:
            lane.queued = True
            self._ready.put_nowait(lane)

    def _supersede(self, older: Pending, newer: Pending) -> None:
        """``newer`` stands for ``older`` too: it takes over its failures, and
        ``older``'s file goes."""
        newer.retries = max(newer.retries, older.retries)
        self.queue.remove(older)
        self.replaced += 1

    def _make_ready(self, lane: Lane) -> None:
        lane.timer = None
        if not self._closing:
            self._ready.put_nowait(lane)

    # -- delivery

    async def _worker(self) -> None:
        while True:
            lane = await self._ready.get()
            if self._closing:
                continue  # stopping: its files stay queued for the next start
            self._inflight += 1
            try:
                await self._attempt(lane)
            except asyncio.CancelledError:
                raise
            except Exception:
                # a bug must not kill the worker; the files stay and the lane retries
                log.exception("notification attempt failed unexpectedly")
                self._after_failure(lane, list(lane.entries), "internal error")
            finally:
                self._inflight -= 1

    async def _attempt(self, lane: Lane) -> None:
        # everything queued now is satisfied by a request that starts now
        batch = list(lane.entries)
        if not batch:
            self._finish(lane)
            return
        lane.inflight = len(batch)
        try:
            status, reason = await self._post(lane.token)
        finally:
            lane.inflight = 0
        if status is not None and 200 <= status < 300:
            self.sent += 1
            metrics.PUSHES.labels("sent").inc()
            self._complete(lane, batch)
        elif status == 410:
            self.gone += 1
            metrics.PUSHES.labels("gone").inc()
            try:
                await asyncio.to_thread(self.tokens.remove, lane.addr, lane.token)
            except Exception as e:
                log.warning("could not remove gone token of %s: %s", lane.addr, e)
            log.info("push token of %s is gone; removed it", lane.addr)
            self._complete(lane, batch)
        else:
            self.failed += 1
            metrics.PUSHES.labels("failed").inc()
            self._after_failure(lane, batch, reason)

    async def _post(self, token: str) -> PostResult:
        if self._session is None:
            self._session = PostClient(
                self.url, self.concurrency, self.config.notification_timeout, keepalive=60
            )
        try:
            status = await self._session.post(token.encode())
            return status, f"HTTP {status}"
        except (TimeoutError, OSError, EOFError, ValueError) as e:
            return None, f"{type(e).__name__}: {e or 'timeout'}"

    def _complete(self, lane: Lane, batch: list[Pending]) -> None:
        done = {id(p) for p in batch}
        for pending in batch:
            self.queue.remove(pending)
        lane.entries = deque(p for p in lane.entries if id(p) not in done)
        self._finish(lane)

    def _after_failure(self, lane: Lane, batch: list[Pending], reason: str) -> None:
        now = self.clock()
        for pending in batch:
            pending.retries += 1
        keep: deque[Pending] = deque()
        for pending in lane.entries:
            if is_expired(pending.retries, pending.start_ts, now, self.base_delay):
                log.warning(LOG_DEADLINE)
                self.dropped += 1
                metrics.PUSHES.labels("dropped").inc()
                self.queue.remove(pending)
            else:
                keep.append(pending)
        if len(keep) > 1:
            # the failed request's and the one that came meanwhile: one request
            # satisfies both, so the newest stays, with the most failures (else the
            # next attempt carries two and a third waits beside it)
            newest = keep.pop()
            for older in keep:
                self._supersede(older, newest)
            keep = deque([newest])
        lane.entries = keep
        self._note_failure(reason, lane.addr)
        if not keep:
            self._finish(lane)
            return
        delay = retry_delay(keep[0].retries, self.base_delay)
        log.debug("%s: %s; retry %d in %g s", LOG_FAILED, reason, keep[0].retries, delay)
        if self._closing:
            return
        lane.timer = asyncio.get_running_loop().call_later(delay, self._make_ready, lane)

    def _note_failure(self, reason: str, addr: str) -> None:
        """``Notification request failed: <reason>: <addr>`` once, then a count per
        minute: the log names the cause, not every message it held up."""
        self.failures.note(f"{LOG_FAILED}: {reason}", addr)

    def _finish(self, lane: Lane) -> None:
        """After an attempt: go again at once for notifications that came meanwhile."""
        if lane.entries and not self._closing:
            self._ready.put_nowait(lane)
            return
        lane.queued = False
        if not lane.entries:
            self.lanes.pop((lane.addr, lane.token), None)
