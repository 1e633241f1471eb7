"""A fleet of idle devices: TLS IMAP connections logged in and in IDLE on INBOX.

``python -m testing.idlefleet HOST PORT ACCOUNTS_FILE [FIRST]`` opens one
connection per ``addr password`` line of the file (loopback only, a bounded
number at once), each from an address of its own from 127.100.0.1 on (device
FIRST + i: ``source_address``; devices come from many networks, and the
relay's limits per address must not count them as one),
logs in (the first login creates the account), SELECTs INBOX and enters IDLE.
It prints ``ready CONNECTED FAILED SECONDS LOGIN_P50_MS LOGIN_P99_MS [REASONS]``
once every connection is idle or failed (login time: from connecting to the
LOGIN's OK), holds them until its standard input closes, then ends IDLE, logs out
and prints ``done``.  One fleet is one process: a bench starts one per core.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import ssl
import sys
import time

# handshakes and logins in flight; a reconnect storm (IDLEFLEET_AT_ONCE) is larger
CONNECT_AT_ONCE = int(os.environ.get("IDLEFLEET_AT_ONCE", "200"))
# a storm's devices come back at random moments within this many seconds
SPREAD = float(os.environ.get("IDLEFLEET_SPREAD", "0"))
STEP_TIMEOUT = 120.0


class Device:
    def __init__(self, addr: str, password: str) -> None:
        self.addr, self.password = addr, password
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.login_seconds = 0.0  # from connecting to the LOGIN's OK

    async def _line(self) -> bytes:
        assert self.reader is not None
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        return line

    async def _expect(self, tag: bytes) -> bytes:
        """The tagged answer ``tag`` (it must be OK), or a continuation for b"+"."""
        while True:
            line = await self._line()
            if tag == b"+" and line.startswith(b"+"):
                return line
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise ConnectionError(line.decode(errors="replace").strip())
                return line

    async def connect(self, host: str, port: int, ctx: ssl.SSLContext, source: str) -> None:
        t0 = time.monotonic()
        self.reader, self.writer = await asyncio.open_connection(
            host, port, ssl=ctx, local_addr=(source, 0)
        )
        greeting = await self._line()
        if not greeting.startswith(b"* OK"):
            raise ConnectionError(greeting.decode(errors="replace").strip())
        quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
        # one command at a time, as the apps do (a pipelined SELECT would be read by
        # imap-login and handed over with the connection)
        self.writer.write(f'a LOGIN {self.addr} "{quoted}"\r\n'.encode())
        await self._expect(b"a")
        self.login_seconds = time.monotonic() - t0
        self.writer.write(b"b SELECT INBOX\r\n")
        await self._expect(b"b")
        self.writer.write(b"c IDLE\r\n")
        await self._expect(b"+")

    async def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(b"DONE\r\nd LOGOUT\r\n")
            await asyncio.wait_for(self.writer.drain(), 10)
        except (OSError, TimeoutError):
            pass
        self.writer.close()


def source_address(n: int) -> str:
    """Device ``n``'s own loopback address, in 127.100.0.0 and up (62,500 per /16)."""
    return f"127.{100 + n // 62_500}.{n // 250 % 250}.{n % 250 + 1}"


async def run(host: str, port: int, accounts: list[tuple[str, str]], first: int = 0) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit("idlefleet: loopback addresses only")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # the key exchange the Delta Chat core offers (rustls with its ring provider:
    # X25519 first, no post-quantum hybrid), not OpenSSL 3.5's X25519MLKEM768, whose
    # client key share the server keeps for the connection's life (README: ~8 KB);
    # Python 3.11 names EC curves only, and its OpenSSL 3.0 offers no hybrid anyway
    with contextlib.suppress(ssl.SSLError):
        ctx.set_ecdh_curve("X25519")
    slots = asyncio.Semaphore(CONNECT_AT_ONCE)
    devices = [Device(a, p) for a, p in accounts]
    failures: list[str] = []

    async def start(n: int, device: Device) -> None:
        if SPREAD:
            await asyncio.sleep(random.uniform(0, SPREAD))
        async with slots:
            try:
                connecting = device.connect(host, port, ctx, source_address(first + n))
                await asyncio.wait_for(connecting, STEP_TIMEOUT)
            except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as e:
                failures.append(str(e) or type(e).__name__)
                device.writer = None

    t0 = time.monotonic()
    await asyncio.gather(*(start(n, d) for n, d in enumerate(devices)))
    ok = len(devices) - len(failures)
    reasons = sorted(set(failures))[:3]
    logins = sorted(d.login_seconds * 1000 for d in devices if d.writer is not None) or [0.0]
    p50, p99 = (logins[min(len(logins) - 1, len(logins) * q // 100)] for q in (50, 99))
    print(f"ready {ok} {len(failures)} {time.monotonic() - t0:.1f} {p50:.0f} {p99:.0f} "
          f"{reasons}", flush=True)  # fmt: skip
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.gather(*(d.close() for d in devices))
    print("done", flush=True)


def main() -> None:
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    with open(path, encoding="utf-8") as f:
        accounts = [tuple(line.split(None, 1)) for line in f if line.strip()]
    asyncio.run(run(host, port, [(a, p.strip()) for a, p in accounts], first))


if __name__ == "__main__":
    main()
