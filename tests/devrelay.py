"""A `make run` relay driven from a test: its process, its printed lines, its facts."""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

from chatmaild.relay import client_tls_context

ROOT = Path(__file__).resolve().parents[1]


class DevRelay:
    """``python -m chatmaild.relay`` (or any command printing its ready block).

    Every line it prints is collected by a thread, so the relay never blocks
    on a full pipe and a test can wait for a line printed long after the start.
    """

    def __init__(
        self, state: Path, *args: str, cmd: Sequence[str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.state = state
        argv = list(cmd) if cmd else [sys.executable, "-m", "chatmaild.relay"]
        self.proc = subprocess.Popen(
            [*argv, "--state", str(state), *args] if cmd is None else argv,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # stop() signals the group, as Ctrl-C in a terminal does
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.wait_line(lambda line: "Ctrl-C stops" in line, timeout=240):
            self.proc.kill()
            raise AssertionError(f"exited {self.proc.wait()} before ready:\n{self.output}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, match: Callable[[str], bool], timeout: float = 60) -> str | None:
        """The first printed line ``match`` accepts, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if match(line)), None)
                if found is not None or self.proc.poll() is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    @property
    def facts(self) -> dict:
        return json.loads((self.state / "relay.json").read_text())

    def printed_account(self) -> tuple[str, str]:
        """Address and password of the ``dclogin:`` link in the ready block."""
        [link] = [line.split()[-1] for line in self.lines if "dclogin:" in line]
        addr, _, query = link.removeprefix("dclogin:").partition("?")
        return addr, urllib.parse.parse_qs(query)["p"][0]

    def imap(self, addr: str, password: str) -> imaplib.IMAP4_SSL:
        conn = imaplib.IMAP4_SSL(
            "127.0.0.1", self.facts["ports"]["imaps"], ssl_context=client_tls_context(), timeout=30
        )
        conn.login(addr, password)
        return conn

    def smtp(self, addr: str, password: str) -> smtplib.SMTP_SSL:
        conn = smtplib.SMTP_SSL(
            "127.0.0.1",
            self.facts["ports"]["submissions"],
            context=client_tls_context(),
            timeout=30,
        )
        conn.login(addr, password)
        return conn

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Signal the command's process group (Ctrl-C) and return its exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(10)
        return rc


def wait_for_message(conn: imaplib.IMAP4_SSL, timeout: float = 30) -> bytes | None:
    """The first message of INBOX, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.select("INBOX")
        _, nums = conn.search(None, "ALL")
        if nums[0].split():
            _, data = conn.fetch(nums[0].split()[0], "(RFC822)")
            return data[0][1]
        time.sleep(0.1)
    return None
