"""A raw Dovecot dict protocol client for protocol tests and benchmarks.

Unlike :mod:`testing.dictclient` it sends lines exactly as given
(several at once for pipelining), can check that a command got no reply, and
parses ITERATE replies.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from chatmaild.dictd.proxy import split_fields, tabescape


class RawDictClient:
    """One connection to a dict socket, speaking raw protocol lines."""

    def __init__(self, path: str | Path, timeout: float = 10.0, hello: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        if hello:
            self.send("H3\t2\t0\t\ttest")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawDictClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, *lines: str | bytes) -> None:
        data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
        self.sock.sendall(data)

    def readline(self) -> str:
        """The next reply line without LF; raises EOFError when the server closed."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("dict server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "surrogateescape")

    def request(self, line: str | bytes) -> str:
        self.send(line)
        return self.readline()

    def silent(self, timeout: float = 0.3) -> bool:
        """True if no reply arrives within ``timeout`` (for commands without a reply)."""
        if self.buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)  # b"" = closed: also no reply
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(old)

    def lookup(self, key: str, user: str = "") -> str:
        return self.request(f"L{tabescape(key)}\t{tabescape(user)}")

    def iterate(self, path: str, flags: int = 0, max_rows: int = 0, user: str = "") -> list:
        """Rows as (key, value) pairs; raises RuntimeError on an F reply."""
        self.send(f"I{flags}\t{max_rows}\t{tabescape(path)}\t{tabescape(user)}")
        rows = []
        while True:
            line = self.readline()
            if line == "":
                return rows
            if not line.startswith("O"):
                raise RuntimeError(f"iterate failed: {line!r}")
            key, value = split_fields(line[1:])
            rows.append((key, value))


def wait_for_socket(path: str | Path, timeout: float = 15.0, proc=None) -> None:
    """Wait until a UNIX socket accepts connections (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before listening")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"{path} not accepting connections after {timeout}s")
