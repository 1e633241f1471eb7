"""The push notifier in-process, against the loopback HTTP sink."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

from chatmaild.common.config import read_config
from chatmaild.dictd.push import (
    LOG_DEADLINE,
    LOG_FAILED,
    Notifier,
    QueueDir,
    decode_pending,
    encode_pending,
    is_expired,
    retry_delay,
)
from chatmaild.dictd.tokens import TokenStore
from tests.fixtures.metadata import DOMAIN

USER = f"carol1234@{DOMAIN}"


def test_retry_ladder_matches_reference():
    assert [retry_delay(n, 8) for n in range(5)] == [0, 8, 64, 512, 4096]
    # five attempts, the sixth is never made
    assert not any(is_expired(n, 1000.0, 1000.0, 8) for n in range(5))
    assert is_expired(5, 1000.0, 1000.0, 8)
    # 5 h deadline counted from creation, also across restarts (retries reset to 0)
    assert not is_expired(0, 0.0, 5 * 3600.0, 8)
    assert is_expired(0, 0.0, 5 * 3600.0 + 1, 8)
    assert is_expired(2, 0.0, 5 * 3600.0 - 10, 8)  # next try (+8 s) would be past it


def test_queue_file_format_is_the_reference_one():
    data = encode_pending(USER, 1700000000.25, "tok")
    assert data == f"{USER}\n1700000000.25\ntok".encode()
    pending = decode_pending("abc", data)
    assert (pending.addr, pending.start_ts, pending.token) == (USER, 1700000000.25, "tok")
    for bad in (b"", b"a@b\n1", b"a@b\nnan\ntok", b"a@b\nxx\ntok", b"\n1\ntok", b"a@b\n1\n"):
        with pytest.raises(ValueError):
            decode_pending("x", bad)


def test_load_cleans_up_spurious_and_unreadable_files(tmp_path):
    queue = QueueDir(tmp_path)
    kept = queue.persist(USER, ["t1", "t2"], 100.0)
    (tmp_path / "leftover.tmp").write_text("half")
    (tmp_path / "garbage").write_text("not a notification")
    (tmp_path / "empty").write_text("")
    loaded = queue.load()
    assert sorted(p.name for p in loaded) == sorted(p.name for p in kept)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in kept)


def make_notifier(metadata_ini, **overrides) -> tuple[Notifier, TokenStore]:
    config = read_config(metadata_ini(**overrides))
    store = TokenStore(config)
    return Notifier(config, store), store


def files(notifier: Notifier) -> list[str]:
    return os.listdir(notifier.queue.path)


async def wait(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def hold_a_request(notifier: Notifier, http_sink) -> None:
    """Start, notify USER once, and return when the push service holds its request
    (``http_sink.pause()`` first)."""
    await notifier.start()
    await notifier.notify(USER)
    await wait(lambda: http_sink.in_flight == 1)


def test_failure_ladder_drops_after_five_attempts(metadata_ini, http_sink, caplog):
    http_sink.set_default(500)
    notifier, store = make_notifier(metadata_ini, notification_retry_delay="0.002")
    store.add(USER, "dead")

    async def run():
        await notifier.start()
        assert await notifier.notify(USER) == 1
        await wait(lambda: notifier.dropped == 1)
        await notifier.stop()

    with caplog.at_level(logging.INFO, logger="chatmaild.dictd.push"):
        asyncio.run(run())
    assert http_sink.count("dead", 500) == 5
    assert [r.getMessage() for r in caplog.records].count(LOG_DEADLINE) == 1
    assert files(notifier) == []
    assert store.tokens(USER) == ["dead"]  # failures never remove a token, only 410 does


def test_a_push_service_down_is_logged_once_per_cause(metadata_ini, http_sink, caplog):
    """20 accounts' notifications failing alike: the cause is named once (and counted
    in a summary at the end), not once per notification (issue 24, outages)."""
    http_sink.set_default(503)
    notifier, store = make_notifier(metadata_ini, notification_retry_delay="0.002")
    users = [f"user{i:04d}@{DOMAIN}" for i in range(20)]
    for i, user in enumerate(users):
        store.add(user, f"tok{i}")

    async def run():
        await notifier.start()
        for user in users:
            await notifier.notify(user)
        await wait(lambda: notifier.dropped == len(users))
        await notifier.stop()

    with caplog.at_level(logging.DEBUG, logger="chatmaild.dictd.push"):
        asyncio.run(run())
    failed = [r for r in caplog.records if r.levelno >= logging.WARNING
              and r.getMessage().startswith(f"{LOG_FAILED}: HTTP 503")]  # fmt: skip
    assert len(failed) == 2, [r.getMessage() for r in failed]  # the first, then the count
    assert failed[1].getMessage().endswith(f"{5 * len(users) - 1} more from 20 client(s)"
                                           " in the last 60 s")  # fmt: skip
    assert [r.getMessage() for r in caplog.records].count(LOG_DEADLINE) == len(users)


def test_old_notification_is_dropped_at_first_failure(metadata_ini, http_sink, caplog):
    http_sink.set_default(500)
    notifier, _ = make_notifier(metadata_ini, notification_retry_delay="8")
    notifier.queue.create()
    notifier.queue.persist(USER, ["late"], time.time() - 5 * 3600 + 4)  # 4 s before deadline

    async def run():
        assert await notifier.start() == 1
        await wait(lambda: notifier.dropped == 1)
        await notifier.stop()

    with caplog.at_level(logging.INFO, logger="chatmaild.dictd.push"):
        asyncio.run(run())
    assert http_sink.count("late") == 1
    assert LOG_DEADLINE in caplog.messages
    assert files(notifier) == []


def test_concurrency_is_bounded(metadata_ini, http_sink):
    notifier, store = make_notifier(metadata_ini, notification_concurrency="4")
    users = [f"user{i:05d}@{DOMAIN}" for i in range(20)]
    for user in users:
        store.add(user, f"tok-{user}")
    http_sink.pause()

    async def run():
        await notifier.start()
        for user in users:
            await notifier.notify(user)
        await wait(lambda: http_sink.in_flight == 4)
        await asyncio.sleep(0.2)  # room for a fifth request, if the bound were broken
        assert http_sink.in_flight == 4
        http_sink.resume()
        await wait(lambda: notifier.sent == 20)
        await notifier.stop()

    asyncio.run(run())
    assert sorted(http_sink.tokens()) == sorted(f"tok-{u}" for u in users)
    assert http_sink.max_in_flight == 4
    assert files(notifier) == []


def test_one_request_in_flight_per_token_and_backlog_coalesces(metadata_ini, http_sink):
    """Notifications for one device never overlap; queued ones ride on the next request."""
    notifier, store = make_notifier(metadata_ini)
    store.add(USER, "phone")
    http_sink.pause()

    async def run():
        await hold_a_request(notifier, http_sink)
        for _ in range(5):  # arrive while the first request is in flight
            await notifier.notify(USER)
        http_sink.resume()
        await wait(lambda: not notifier.lanes)
        await notifier.stop()

    asyncio.run(run())
    assert http_sink.max_in_flight == 1
    assert http_sink.tokens() == ["phone", "phone"]
    assert files(notifier) == []


def test_a_push_service_down_keeps_one_waiting_notification_per_device(metadata_ini, http_sink):
    """While the service fails, 200 messages for one device leave at most two
    notifications (one in flight or retrying, one waiting), in memory and on disk;
    the ladder goes on for the newest, and once the service is back one request
    wakes the device and every file is gone."""
    http_sink.set_default(503)
    notifier, store = make_notifier(metadata_ini, notification_retry_delay="0.05")
    store.add(USER, "phone")

    async def run():
        await notifier.start()
        for _ in range(200):
            await notifier.notify(USER)
            assert notifier.pending_count <= 2 and len(files(notifier)) <= 2
        await wait(lambda: notifier.failed >= 2)
        assert notifier.replaced >= 198
        http_sink.set_default(200)
        await wait(lambda: not notifier.lanes)
        await notifier.stop()

    asyncio.run(run())
    assert http_sink.count("phone", 200) == 1
    assert files(notifier) == []
    assert notifier.dropped == 0


def test_410_removes_only_that_token(metadata_ini, http_sink):
    http_sink.set_status("old", 410)
    notifier, store = make_notifier(metadata_ini)
    store.add(USER, "old")
    store.add(USER, "new")
    other = f"dave12345@{DOMAIN}"
    store.add(other, "old")  # same token string on another account stays

    async def run():
        await notifier.start()
        await notifier.notify(USER)
        await wait(lambda: notifier.gone == 1 and notifier.sent == 1)
        await notifier.stop()

    asyncio.run(run())
    assert store.tokens(USER) == ["new"]
    assert store.tokens(other) == ["old"]
    assert files(notifier) == []


def test_unreachable_endpoint_is_retried(metadata_ini, http_sink):
    # a port nobody listens on: connection refused counts as a failure like a 5xx
    notifier, store = make_notifier(
        metadata_ini, notification_url="http://127.0.0.1:9/notify", notification_retry_delay="0.01"
    )
    store.add(USER, "tok")

    async def run():
        await notifier.start()
        await notifier.notify(USER)
        await wait(lambda: notifier.failed >= 2)
        assert len(files(notifier)) == 1  # still queued between attempts
        await notifier.stop()

    asyncio.run(run())
    assert len(files(notifier)) == 1


def test_empty_url_disables_push_and_keeps_the_queue(metadata_ini):
    notifier, store = make_notifier(metadata_ini, notification_url="")
    store.add(USER, "tok")
    notifier.queue.create()
    notifier.queue.persist(USER, ["old"], time.time())

    async def run():
        assert await notifier.start() == 1
        assert await notifier.notify(USER) == 0
        await asyncio.sleep(0.1)
        await notifier.stop()

    asyncio.run(run())
    assert len(files(notifier)) == 1  # kept for when an endpoint is configured


def test_a_failed_request_and_the_notification_that_came_meanwhile_become_one(
    metadata_ini, http_sink
):
    """A notification that arrives while its device's request is failing does not
    wait beside the failed one: after the failure one file remains (the newest,
    with the failure counted), so the next attempt carries one and nothing waits
    beside it."""
    http_sink.set_default(503)
    notifier, store = make_notifier(metadata_ini, notification_retry_delay="30")
    store.add(USER, "phone")
    http_sink.pause()

    async def run():
        await hold_a_request(notifier, http_sink)
        await notifier.notify(USER)  # waits beside the request in flight
        await notifier.notify(USER)  # replaces the waiting one
        assert notifier.pending_count == 2 and notifier.replaced == 1
        http_sink.resume()
        await wait(lambda: notifier.failed == 1)
        (lane,) = notifier.lanes.values()
        assert [p.retries for p in lane.entries] == [1]  # on the ladder's next step
        assert lane.timer is not None  # retrying in 30 s, not at once
        assert len(files(notifier)) == 1 and notifier.replaced == 2
        await notifier.stop()

    asyncio.run(run())
    assert http_sink.count("phone", 503) == 1
    assert len(files(notifier)) == 1  # kept for the next start
