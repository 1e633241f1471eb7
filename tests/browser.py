"""Debian's headless Chromium, driven over the DevTools protocol (aiohttp's websocket client).

``Chromium(profile_dir)`` starts ``/usr/bin/chromium`` with a fresh profile and
without any background networking of its own; ``visit(url)`` loads one page in
a phone-sized tab and returns what a test needs: every request the page made
(with the bytes each took on the wire), the visible text, the links and a
screenshot.  ``close()`` ends the browser's whole process group.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--ignore-certificate-errors",  # the relay's self-signed certificate
    "--remote-debugging-port=0",
)
PHONE = {"width": 412, "height": 915, "deviceScaleFactor": 1, "mobile": True}


@dataclass
class Request:
    url: str
    status: int | None = None
    mime_type: str | None = None
    wire_bytes: float = 0.0
    finished: bool = False
    failed: str | None = None


@dataclass
class Visit:
    url: str
    requests: list[Request] = field(default_factory=list)
    text: str = ""
    links: list[str] = field(default_factory=list)
    screenshot: bytes = b""

    @property
    def wire_bytes(self) -> int:
        return int(sum(r.wire_bytes for r in self.requests))


class Chromium:
    def __init__(self, profile_dir: Path) -> None:
        self.profile_dir = profile_dir
        profile_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = profile_dir.parent / f"{profile_dir.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile_dir}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # close() ends its helpers (zygote, crashpad) too
        )
        self.ws_url = self._wait_devtools_address()
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._events: asyncio.Queue | None = None
        self._reader: asyncio.Task | None = None

    def _wait_devtools_address(self, timeout: float = 60) -> str:
        # Chromium writes its port and browser target path here once it listens
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                port, path = port_file.read_text().split()[:2]
                return f"ws://127.0.0.1:{int(port)}{path}"
            time.sleep(0.05)
        raise RuntimeError(f"chromium did not open its DevTools port: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    # -------------------------------------------------------- DevTools protocol

    async def _connect(self) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.ws_url, max_msg_size=64 * 2**20)
        self._events = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._ws is not None and self._events is not None
        async for msg in self._ws:
            data = msg.json()
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self._events.put_nowait(data)

    async def send(self, method: str, session: str | None = None, **params: Any) -> dict:
        if self._ws is None:
            await self._connect()
        assert self._ws is not None
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self._ws.send_json(msg)
        reply = await asyncio.wait_for(fut, 60)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def visit(self, url: str, timeout: float = 60) -> Visit:
        """Load ``url`` in a fresh phone-sized tab; record every request until it loaded."""
        target = (await self.send("Target.createTarget", url="about:blank"))["targetId"]
        session = (await self.send("Target.attachToTarget", targetId=target, flatten=True))[
            "sessionId"
        ]
        assert self._events is not None
        try:
            await self.send("Emulation.setDeviceMetricsOverride", session, **PHONE)
            await self.send("Network.enable", session)
            await self.send("Network.setCacheDisabled", session, cacheDisabled=True)
            await self.send("Page.enable", session)
            visit = Visit(url)
            requests: dict[str, Request] = {}
            await self.send("Page.navigate", session, url=url)
            loaded = False
            deadline = time.monotonic() + timeout
            while True:
                # loaded, every request finished, and then a short quiet spell
                settled = loaded and all(r.finished for r in requests.values())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{url} did not finish loading")
                try:
                    event = await asyncio.wait_for(
                        self._events.get(), 0.3 if settled else min(left, 1.0)
                    )
                except TimeoutError:
                    if settled:
                        break
                    continue
                if event.get("sessionId") != session:
                    continue
                method, params = event["method"], event.get("params", {})
                req = requests.get(params.get("requestId", ""))
                if method == "Network.requestWillBeSent":
                    req = Request(params["request"]["url"])
                    requests[params["requestId"]] = req
                    visit.requests.append(req)
                elif method == "Network.responseReceived" and req:
                    req.status = params["response"]["status"]
                    req.mime_type = params["response"]["mimeType"]
                elif method == "Network.loadingFinished" and req:
                    req.wire_bytes = params["encodedDataLength"]
                    req.finished = True
                elif method == "Network.loadingFailed" and req:
                    req.failed = params.get("errorText", "failed")
                    req.finished = True
                elif method == "Page.loadEventFired":
                    loaded = True
            visit.text = await self._evaluate(session, "document.body.innerText")
            visit.links = await self._evaluate(
                session, "Array.from(document.querySelectorAll('a'), a => a.href)"
            )
            shot = await self.send("Page.captureScreenshot", session, format="png")
            visit.screenshot = base64.b64decode(shot["data"])
            return visit
        finally:
            await self.send("Target.closeTarget", targetId=target)

    async def _evaluate(self, session: str, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", session, expression=expression, returnByValue=True
        )
        return result["result"].get("value")

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    def close(self) -> None:
        """End the browser and every process it started."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # helpers still in the group
        if self.proc.poll() is None:
            self.proc.wait()
        self._log.close()
