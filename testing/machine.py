"""A freshly booted Debian machine for package tests (scripts/debian-root.sh boot).

``Machine("bookworm", binds={...})`` boots a ``--bare`` root of that release
under systemd-nspawn (real systemd as PID 1, a private network namespace with
only lo, a tmpfs overlay: nothing survives it) and powers it off on exit,
whatever happened.  :meth:`Machine.sh` runs a shell command inside (all of the
container's namespaces); :meth:`Machine.netns_argv` wraps a host command so it
runs in the container's network namespace only (the host's files and Python:
the Delta Chat core from the test venv talks to the machine's 127.0.0.1).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "debian-root.sh"
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class MachineError(RuntimeError):
    pass


class Machine:
    def __init__(self, suite: str, binds: dict[str, str] | None = None, boot_timeout: float = 900):
        self.suite = suite
        self.binds = binds or {}
        self.boot_timeout = boot_timeout  # includes (re)building a stale cached root
        self.proc: subprocess.Popen | None = None
        self.leader = 0
        self.log = b""

    def __enter__(self) -> Machine:
        cmd = ["setpriv", "--pdeathsig", "TERM", str(SCRIPT), "--bare", "--private-network"]
        cmd += [f"--bind-ro={src}:{dst}" for src, dst in self.binds.items()]
        cmd += [self.suite, "boot"]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            self.leader = int(self._first_line())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _first_line(self) -> str:
        assert self.proc and self.proc.stdout
        deadline = time.monotonic() + self.boot_timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.poll() is not None else b""  # type: ignore[union-attr]
                raise MachineError(f"{self.suite} did not boot: {err.decode(errors='replace')}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1)
                if not chunk:
                    continue
                line += chunk
        return line.decode().strip()

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the script powers the machine off
        try:
            _, err = self.proc.communicate(timeout=90)
            self.log = err
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()

    # ------------------------------------------------------------ running things

    def argv(self, command: str) -> list[str]:
        """A shell command inside the machine, with a clean environment."""
        return [
            "nsenter", "-t", str(self.leader), "-a", "--",
            "env", "-i", f"PATH={INSIDE_PATH}", "LANG=C.UTF-8", "HOME=/root",
            "/bin/sh", "-c", command,
        ]  # fmt: skip

    def sh(self, command: str, check: bool = True, timeout: float = 300, **kw) -> str:
        """Run ``command`` inside; its stdout (stderr joined); MachineError on failure."""
        res = subprocess.run(
            self.argv(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and res.returncode != 0:
            raise MachineError(f"{command!r} exited {res.returncode}:\n{res.stdout[-6000:]}")
        return res.stdout

    def ok(self, command: str) -> bool:
        """Whether ``command`` succeeds inside."""
        return self.run_rc(command) == 0

    def run_rc(self, command: str) -> int:
        return subprocess.run(
            self.argv(command), stdin=subprocess.DEVNULL, capture_output=True, timeout=300
        ).returncode

    def netns_argv(self, argv: list[str]) -> list[str]:
        """``argv`` (a host program) in the machine's network namespace only."""
        return ["nsenter", "-t", str(self.leader), "-n", "--", *argv]

    def wait_for(self, command: str, timeout: float = 60, what: str = "") -> None:
        """Poll until ``command`` succeeds inside."""
        deadline = time.monotonic() + timeout
        while not self.ok(command):
            if time.monotonic() > deadline:
                raise MachineError(f"{what or command} not reached within {timeout} s")
            time.sleep(0.2)
