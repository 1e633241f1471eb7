"""filtermail against real Postfix + Dovecot on loopback, TLS submission.

Figures (issue 3):

- throughput of ~4 KB encrypted messages over 4 parallel implicit-TLS
  submission connections, through filtermail and with the filter bypassed
  (the same stack without ``smtpd_proxy_filter``), and their ratio (target
  >= 0.9).  Throughput counts a message when it is in the recipient's
  Maildir, as the reference's figures do (~140 of ~245 msg/s, 0.57); the
  rate at which Postfix answered 250 is printed too.  Each figure is the
  median of ROUNDS rounds, the two stacks taking turns;
- the ceiling any proxy filter has on this machine: the same stack with
  Postfix's own re-injection smtpd as the "filter" (submission's
  ``smtpd_proxy_filter`` pointed straight at it: a second smtpd session per
  message, no checks at all);
- the same with 128 KB messages through filtermail (target >= 150 msg/s);
- filtermail (outgoing) peak RSS while 10 x 25 MB messages are submitted at
  once (target <= 1.5 x bytes in flight + 40 MB);
- filtermail's own CPU time per message, alone against an SMTP sink that
  stands in for Postfix (new proxy connection per message, as Postfix does;
  UNIX sockets both ways, as in production), for mail to a local recipient
  and to another domain (DKIM-signed).

Messages in the stack runs go to a local recipient, so each one is also
delivered over LMTP.  All processes share the machine's cores, so the ratio
is a ratio of CPU cost per message.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from chatmaild.common.config import write_config
from chatmaild.filtermail.dkim import generate_key
from chatmaild.relay.render import postfix_path
from chatmaild.relay.stack import Relay
from testing import mails

BASE = ["postfix", "dovecot", "doveauth"]
FILTERED = [*BASE, "filtermail"]
CONNECTIONS = 4
ROUNDS = 3
UNLIMITED = {"max_user_send_per_minute": 10**6, "max_user_send_burst_size": 10**6}


def _vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _accounts(relay: Relay, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        addr, pw = relay.new_credentials()
        relay.imap(addr, pw).logout()
        out.append((addr, pw))
    return out


def _count_delivered(relay: Relay, addr: str) -> int:
    home = Path(relay.config.mailboxes_dir) / addr
    return sum(1 for p in home.rglob("*") if p.is_file() and p.parent.name in ("new", "cur"))


def _send_parallel(relay: Relay, senders, rcpt: str, size: int, per_conn: int) -> float:
    """Seconds until every message was accepted (250) over len(senders) connections."""
    payloads = [mails.encrypted_message(addr, [rcpt], size=size) for addr, _ in senders]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(senders) + 1)

    def worker(i: int) -> None:
        addr, pw = senders[i]
        try:
            with relay.smtp(addr, pw) as conn:
                barrier.wait()
                for _ in range(per_conn):
                    conn.sendmail(addr, [rcpt], payloads[i])
        except BaseException as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(senders))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    if errors:
        raise errors[0]
    return elapsed


def _wait_delivered(relay: Relay, addr: str, count: int, timeout: float = 120) -> float:
    start = time.monotonic()
    while _count_delivered(relay, addr) < count:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"only {_count_delivered(relay, addr)} of {count} delivered")
        time.sleep(0.02)
    return time.monotonic() - start


class Stack:
    """A running relay with its senders; each round goes to a fresh recipient."""

    def __init__(self, state: Path, components: list[str]) -> None:
        self.relay = Relay(state, UNLIMITED, components=components)
        self.relay.start()
        self.senders = _accounts(self.relay, CONNECTIONS)

    def proxy_to_reinject(self) -> None:
        """Make Postfix's re-injection smtpd the submission proxy filter."""
        c, queue = self.relay.config, self.relay.layout.postfix_queue_dir
        master = self.relay.layout.postfix_config_dir / "master.cf"
        text = master.read_text()
        ours = f"smtpd_proxy_filter=unix:{postfix_path(c.filtermail_smtp_socket, queue)}"
        if ours not in text:
            raise RuntimeError(f"{master}: no {ours}")
        reinject = postfix_path(c.postfix_reinject_socket, queue)
        master.write_text(text.replace(ours, f"smtpd_proxy_filter=unix:{reinject}"))
        subprocess.run(
            ["postfix", "-c", str(master.parent), "reload"], check=True, capture_output=True
        )
        time.sleep(2)  # smtpd processes of the old configuration finish their connection

    def round(self, size: int, total: int) -> tuple[float, float]:
        """(accepted msg/s, delivered msg/s) for ``total`` messages."""
        ((rcpt, _),) = _accounts(self.relay, 1)
        per_conn = total // CONNECTIONS
        accepted = _send_parallel(self.relay, self.senders, rcpt, size, per_conn)
        extra = _wait_delivered(self.relay, rcpt, per_conn * CONNECTIONS)
        n = per_conn * CONNECTIONS
        return n / accepted, n / (accepted + extra)

    def close(self) -> None:
        self.relay.stop()


def _medians(results: list[tuple[float, float]]) -> tuple[float, float]:
    return (
        statistics.median(r[0] for r in results),
        statistics.median(r[1] for r in results),
    )


def _throughput(root: Path) -> None:
    stacks = {
        "bypass": Stack(root / "bypass", BASE),
        "null_proxy": Stack(root / "null-proxy", FILTERED),
        "filtermail": Stack(root / "filtermail", FILTERED),
    }
    try:
        stacks["null_proxy"].proxy_to_reinject()
        for stack in stacks.values():  # warm up: processes, pools, caches
            stack.round(4096, 40)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in stacks}
        for _ in range(ROUNDS):  # the stacks take turns, so a noisy moment hits all
            for name, stack in stacks.items():
                runs[name].append(stack.round(4096, 800))
        acc = {name: _medians(r)[0] for name, r in runs.items()}
        dlv = {name: _medians(r)[1] for name, r in runs.items()}
        for name in stacks:
            print(
                f"throughput_4k_{name}: {dlv[name]:.1f} msg/s (accepted at {acc[name]:.1f} msg/s)"
            )
        ratio = dlv["filtermail"] / dlv["bypass"]
        print(f"throughput_4k_ratio: {ratio:.2f} x (target >= 0.9; reference 0.57)")
        ceiling = dlv["null_proxy"] / dlv["bypass"]
        print(f"throughput_4k_null_proxy_ratio: {ceiling:.2f} x (ceiling for any proxy filter)")
        print(
            f"throughput_4k_filtermail_vs_null_proxy: {dlv['filtermail'] / dlv['null_proxy']:.2f} x"
        )
        print(f"accepted_4k_ratio: {acc['filtermail'] / acc['bypass']:.2f} x")
        big = [stacks["filtermail"].round(128 * 1024, 300) for _ in range(ROUNDS)]
        g_acc, g_dlv = _medians(big)
        print(f"throughput_128k_filtermail: {g_dlv:.1f} msg/s (target >= 150; "
              f"accepted at {g_acc:.1f} msg/s)")  # fmt: skip
    finally:
        for stack in stacks.values():
            stack.close()


def _peak_rss(root: Path, size: int = 25 * 2**20, parallel: int = 10) -> None:
    with Relay(root / "rss", UNLIMITED, components=FILTERED) as relay:
        pid = relay._procs["filtermail"].pid
        senders = _accounts(relay, parallel)
        ((rcpt, _),) = _accounts(relay, 1)
        _send_parallel(relay, senders, rcpt, size, 1)
        peak = _vm_kb(pid, "VmHWM") / 1024
        # drop the delivered 250 MB right away, the bench is about memory not disk
        shutil.rmtree(Path(relay.config.mailboxes_dir) / rcpt, ignore_errors=True)
    flight = parallel * len(mails.encrypted_message("a@b.c", ["d@e.f"], size=size)) / 2**20
    print(f"filtermail_peak_rss_10x25MB: {peak:.0f} MB (in flight {flight:.0f} MB, "
          f"target <= {1.5 * flight + 40:.0f} MB)")  # fmt: skip


# ------------------------------------------------- filtermail alone, CPU per message


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Stands in for Postfix's reinject service: accepts everything, pipelining."""
    writer.write(b"220 sink ESMTP\r\n")
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"DATA":
            writer.write(b"354 go on\r\n")
            await reader.readuntil(b"\r\n.\r\n")
            writer.write(b"250 2.0.0 Ok: queued\r\n")
        elif verb == b"EHLO":
            writer.write(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            break
        else:
            writer.write(b"250 ok\r\n")
    writer.close()


async def _proxy_session(path: str, sender: str, rcpt: str, payload: bytes) -> float:
    """One message the way Postfix's smtpd_proxy_filter client sends it (a connection
    each); seconds from connecting to the 250 after DATA."""
    start = time.monotonic()
    reader, writer = await asyncio.open_unix_connection(path)

    async def reply(line: bytes | None = None) -> bytes:
        if line is not None:
            writer.write(line)
        while True:
            got = await reader.readline()
            if got[3:4] != b"-":
                return got

    await reply()
    await reply(b"EHLO proxy.example\r\n")
    for command in (f"MAIL FROM:<{sender}>\r\n", f"RCPT TO:<{rcpt}>\r\n", "DATA\r\n"):
        await reply(command.encode())
    answer = await reply(payload + b".\r\n")
    if not answer.startswith(b"250"):
        raise RuntimeError(f"filtermail answered {answer!r}")
    elapsed = time.monotonic() - start
    await reply(b"QUIT\r\n")
    writer.close()
    return elapsed


async def _drive(path: str, count: int, sender: str, rcpt: str, payload: bytes) -> None:
    left = [count]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await _proxy_session(path, sender, rcpt, payload)

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))


def filter_alone_config(work: Path, filter_path: str, sink_path: str) -> Path:
    """chatmail.ini for filtermail outgoing alone in ``work``: its socket, a sink for
    re-injection, a fresh DKIM key, no limits."""
    key, _ = generate_key()
    (work / "dkim.key").write_bytes(key)
    return write_config(
        work / "chatmail.ini",
        mail_domain="chat.example",
        filtermail_smtp_socket=filter_path,
        postfix_reinject_socket=sink_path,
        dkim_key_path=work / "dkim.key",
        mailboxes_dir=work / "mail",
        passdb_path=work / "passdb.sqlite",
        **UNLIMITED,
    )


def run_against_sink(
    cmd: list[str],
    log_path: Path,
    sink_path: str,
    ready_path: str,
    body: Callable[[subprocess.Popen], Awaitable[None]],
    cwd: Path | None = None,
) -> None:
    """Run the filter process ``cmd`` (stderr to ``log_path``) with a sink on its
    re-injection socket; once ``ready_path`` accepts, ``await body(proc)``.
    The process and the sink are stopped however ``body`` ends."""
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stderr=log, cwd=cwd)

    async def run() -> None:
        server = await asyncio.start_unix_server(_sink, sink_path, limit=2**26)
        for _ in range(200):
            try:
                (await asyncio.open_unix_connection(ready_path))[1].close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        await body(proc)
        proc.terminate()  # closes its pooled connections, so the sink's tasks end
        await asyncio.to_thread(proc.wait)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait()
        log.close()


def _cpu_per_message(root: Path) -> None:
    work = root / "alone"
    work.mkdir()
    filter_path, sink_path = str(work / "filtermail.sock"), str(work / "reinject.sock")
    ini = filter_alone_config(work, filter_path, sink_path)
    cmd = [sys.executable, "-m", "chatmaild.filtermail.main", "--config", str(ini), "outgoing"]

    async def measure(proc: subprocess.Popen) -> None:
        sender = "sender001@chat.example"
        for size, rcpt, count in (
            (4096, "rcpt00001@chat.example", 3000),
            (4096, "rcpt00001@other.example", 2000),
            (128 * 1024, "rcpt00001@chat.example", 600),
        ):
            payload = mails.encrypted_message(sender, [rcpt], size=size)
            await _drive(filter_path, 100, sender, rcpt, payload)  # warm up
            before, start = _cpu_seconds(proc.pid), time.monotonic()
            await _drive(filter_path, count, sender, rcpt, payload)
            rate = count / (time.monotonic() - start)
            per_msg = (_cpu_seconds(proc.pid) - before) / count * 1e6
            where = "local" if rcpt.endswith("chat.example") else "remote_signed"
            print(f"filtermail_cpu_{size // 1024}k_{where}: {per_msg:.0f} us/msg "
                  f"(alone against a sink: {rate:.0f} msg/s)")  # fmt: skip

    run_against_sink(cmd, work / "filtermail.log", sink_path, filter_path, measure)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-filtermail-", dir="/tmp"))
    root.chmod(0o755)
    try:
        _cpu_per_message(root)
        _throughput(root)
        _peak_rss(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
