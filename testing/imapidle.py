"""A minimal IMAP IDLE client (imaplib has no IDLE before Python 3.14).

Used by the relay tests and ``bench_relay`` to see when Dovecot tells an idle
client about new mail.
"""

from __future__ import annotations

import os
import socket
import ssl
import time


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class IdleClient:
    def __init__(self, host: str, port: int, addr: str, password: str, timeout: float = 30):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw)
        self.buf = b""
        self.tag = 0
        self.exists = 0
        self._readline()  # greeting
        self.command(f"LOGIN {_quote(addr)} {_quote(password)}")
        for line in self.command("SELECT INBOX"):
            if line.endswith(b" EXISTS"):
                self.exists = int(line.split()[1])

    def _readline(self, deadline: float | None = None) -> bytes:
        while b"\r\n" not in self.buf:
            if deadline is not None:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("IMAP server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def command(self, text: str) -> list[bytes]:
        self.tag += 1
        tag = f"t{self.tag}".encode()
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        lines = []
        while True:
            line = self._readline()
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"IMAP {text.split()[0]} failed: {line!r}")
                return lines
            lines.append(line)

    def idle(self) -> None:
        self.tag += 1
        self._idle_tag = f"t{self.tag}".encode()
        self.sock.sendall(self._idle_tag + b" IDLE\r\n")
        while not self._readline().startswith(b"+"):
            pass

    def wait_exists(self, timeout: float = 10) -> int:
        """Block until the server announces more messages than seen; return the new count."""
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("no EXISTS while idling")
            line = self._readline(deadline)
            if line.endswith(b" EXISTS") and int(line.split()[1]) > self.exists:
                self.exists = int(line.split()[1])
                return self.exists

    def done(self) -> None:
        self.sock.settimeout(30)
        self.sock.sendall(b"DONE\r\n")
        while not self._readline().startswith(self._idle_tag + b" "):
            pass

    def close(self) -> None:
        try:
            self.sock.settimeout(5)
            self.command("LOGOUT")
        except (OSError, RuntimeError, ConnectionError):
            pass
        self.sock.close()


def tcp_connections_held(pid: int) -> int:
    """How many TCP connections process ``pid`` holds.  A Dovecot ``imap`` process
    serves several clients (client_limit) and outlives them, so whether a client
    is awake or hibernated shows in who holds its connection, not in a count of
    processes; 0 for a process that is gone."""
    try:
        inodes = set()
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                for line in list(f)[1:]:
                    fields = line.split()
                    if fields[3] == "01":  # ESTABLISHED
                        inodes.add(fields[9])
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    held = 0
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            held += 1
    return held
