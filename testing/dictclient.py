"""A blocking Dovecot dict protocol client for tests and benchmarks.

It speaks the lines Dovecot's proxy dict sends (HELLO, LOOKUP, BEGIN/SET/COMMIT)
so a daemon can be driven over its real socket without Dovecot.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable


class DictClient:
    def __init__(self, path: str, user: str = "", dict_name: str = "", timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.txid = 0
        self.send(f"H3\t2\t0\t{user}\t{dict_name}")

    @classmethod
    def wait(cls, path: str, timeout: float = 15.0, **kw) -> DictClient:
        """Connect once the daemon listens (it may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(path, **kw)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def send(self, line: str) -> None:
        self.file.write(line.encode() + b"\n")
        self.file.flush()

    def readline(self) -> str:
        line = self.file.readline()
        if not line:
            raise ConnectionError("dict server closed the connection")
        return line.decode().rstrip("\n")

    def request(self, line: str) -> str:
        self.send(line)
        return self.readline()

    def lookup(self, key: str, user: str = "") -> str:
        """The raw reply line, e.g. ``Ovalue`` or ``N``."""
        return self.request(f"L{key}\t{user}" if user else f"L{key}")

    def transaction(self, user: str, changes: Iterable[tuple[str, str, str | None]]) -> str:
        """BEGIN, one SET (op "set") or UNSET (op "unset") per change, COMMIT; the reply line."""
        self.txid += 1
        tx = self.txid
        self.send(f"B{tx}\t{user}")
        for op, key, value in changes:
            if op == "set":
                self.send(f"S{tx}\t{key}\t{value if value is not None else ''}")
            else:
                self.send(f"U{tx}\t{key}")
        return self.request(f"C{tx}")

    def set(self, user: str, key: str, value: str) -> str:
        return self.transaction(user, [("set", key, value)])

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> DictClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
