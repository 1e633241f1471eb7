"""A loopback HTTP server standing in for the push notification service.

It records every POST (path, body = the device token, arrival time) and
answers 200, or per token whatever status the test scripted (e.g. 500 twice,
then 200; or 410 forever).  It runs its own event loop in a daemon thread, so
plain synchronous tests and benchmarks can use it::

    with HttpSink() as sink:
        sink.script("tok1", [500, 500])     # then the default 200
        sink.set_status("tok2", 410)       # always
        ... configure notification_url = sink.url ...
        sink.wait_for(lambda s: s.count("tok1") >= 3)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Post:
    path: str
    token: str
    status: int  # what the sink answered
    at: float  # time.time() at arrival


class HttpSink:
    """Records POSTs on 127.0.0.1:<free port>; answers per token."""

    def __init__(self, host: str = "127.0.0.1", default_status: int = 200) -> None:
        self.host = host
        self.port = 0
        self.default_status = default_status
        self.posts: list[Post] = []
        self._statuses: dict[str, int] = {}
        self._scripts: dict[str, deque[int]] = {}
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self.delay = 0.0  # seconds to wait before answering (to observe concurrency)
        self._running = threading.Event()  # cleared by pause(): requests wait unanswered
        self._running.set()
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/notify"

    # -- scripting

    def set_status(self, token: str, status: int) -> None:
        """Answer ``status`` to every POST of ``token`` from now on."""
        with self._lock:
            self._statuses[token] = status
            self._scripts.pop(token, None)

    def script(self, token: str, statuses: Iterable[int]) -> None:
        """Answer these statuses to the next POSTs of ``token``, then the usual one."""
        with self._lock:
            self._scripts[token] = deque(statuses)

    def set_default(self, status: int) -> None:
        with self._lock:
            self.default_status = status
            self._statuses.clear()
            self._scripts.clear()

    def pause(self) -> None:
        """Hold every request (counted in ``in_flight``) until :meth:`resume`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def _answer(self, token: str) -> int:
        script = self._scripts.get(token)
        if script:
            return script.popleft()
        return self._statuses.get(token, self.default_status)

    # -- inspection

    def tokens(self, status: int | None = None) -> list[str]:
        with self._lock:
            return [p.token for p in self.posts if status is None or p.status == status]

    def count(self, token: str, status: int | None = None) -> int:
        return self.tokens(status).count(token)

    def clear(self) -> None:
        with self._lock:
            self.posts.clear()

    def wait_for(self, predicate: Callable[[HttpSink], bool], timeout: float = 30.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every POST); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))
        return True

    # -- server

    async def _handle(self, request):
        from aiohttp import web

        body = await request.read()
        token = body.decode("utf-8", "replace")
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            while not self._running.is_set():
                await asyncio.sleep(0.005)
        finally:
            with self._lock:
                self.in_flight -= 1
        with self._lock:
            status = self._answer(token) if request.method == "POST" else 405
            self.posts.append(Post(request.path, token, status, time.time()))
            self._lock.notify_all()
        return web.Response(status=status, text="")

    def start(self) -> HttpSink:
        from aiohttp import web

        started = threading.Event()
        errors: list[BaseException] = []

        async def serve() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            await site.start()
            sock = site._server.sockets[0]  # type: ignore[union-attr]
            self.port = sock.getsockname()[1]

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(serve())
            except BaseException as e:  # report to start(), do not die silently
                errors.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="httpsink", daemon=True)
        self._thread.start()
        started.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> HttpSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SinkProcess:
    """An :class:`HttpSink` in a child process, for benchmarks: the sink then does not
    share a GIL with the code that drives the load, so arrival times are not skewed."""

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_sink_child, args=(child,), daemon=True)
        self._proc.start()
        self.url: str = self._conn.recv()

    def _call(self, command: str):
        self._conn.send(command)
        return self._conn.recv()

    def posts(self) -> list[Post]:
        return self._call("posts")

    def count(self) -> int:
        return self._call("count")

    def clear(self) -> None:
        self._call("clear")

    def wait_count(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self) -> None:
        if self._proc.is_alive():
            self._call("stop")
            self._proc.join(10)

    def __enter__(self) -> SinkProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _sink_child(conn) -> None:
    with HttpSink() as sink:
        conn.send(sink.url)
        while True:
            command = conn.recv()
            if command == "posts":
                with sink._lock:
                    conn.send(list(sink.posts))
            elif command == "count":
                conn.send(len(sink.posts))
            elif command == "clear":
                sink.clear()
                conn.send(None)
            else:
                conn.send(None)
                return
