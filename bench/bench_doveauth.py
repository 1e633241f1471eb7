"""doveauth throughput: lookups of existing accounts, account creations, idle memory.

Runs the real doveauth daemon on a socket in a temp dir and drives it the way
Dovecot's auth process does (HELLO, then LOOKUP lines, one outstanding
request per connection).  Load comes from separate client processes so the
daemon's own event loop is what is measured.

Targets (issue 2, on a 2-core machine): >= 20,000 lookups/s over 50
connections with p99 < 5 ms; >= 200 creations/s; RSS < 40 MB at idle.
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chatmaild.accounts import AccountStore, hash_password
from chatmaild.config import read_config, write_config

DOMAIN = "bench.example.org"
ACCOUNTS = 2000
CONNECTIONS = 50
CLIENT_PROCS = 2
LOOKUP_SECONDS = 8.0
CREATIONS = 600
CREATE_CONNECTIONS = 16


def esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")


def lookup_line(i: int) -> bytes:
    addr = f"user{i % ACCOUNTS:05d}@{DOMAIN}"
    if i % 2:
        return f"Lshared/userdb/{esc(addr)}\t{addr}\n".encode()
    return f'Lshared/passdb/{esc("bench-password")}"{esc(addr)}\t{addr}\n'.encode()


def _client(sock_path: str, nconn: int, seconds: float, offset: int, out) -> None:
    """Keep one request in flight per connection for ``seconds``; report latencies."""
    sel = selectors.DefaultSelector()
    conns = []
    for n in range(nconn):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        s.sendall(b"H3\t2\t0\t\tauth\n")
        s.setblocking(False)
        conns.append(s)
        sel.register(s, selectors.EVENT_READ, data=[n, b"", 0])
    latencies: list[int] = []
    errors = 0
    i = offset
    deadline = time.perf_counter() + seconds
    for s in conns:
        key = sel.get_key(s)
        key.data[2] = time.perf_counter_ns()
        s.send(lookup_line(i))
        i += 1
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            state = key.data
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("doveauth closed a connection")
            state[1] += chunk
            while b"\n" in state[1]:
                line, _, state[1] = state[1].partition(b"\n")
                latencies.append(time.perf_counter_ns() - state[2])
                if not line.startswith(b"O"):
                    errors += 1
                state[2] = time.perf_counter_ns()
                s.send(lookup_line(i))
                i += 1
    out.send((latencies, errors))
    for s in conns:
        s.close()


def measure_lookups(sock_path: str) -> tuple[float, float, float, int]:
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    per = CONNECTIONS // CLIENT_PROCS
    for p in range(CLIENT_PROCS):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_client, args=(sock_path, per, LOOKUP_SECONDS, p * 7919, send))
        proc.start()
        pipes.append(recv)
        procs.append(proc)
    latencies: list[int] = []
    errors = 0
    for recv in pipes:
        lat, err = recv.recv()
        latencies.extend(lat)
        errors += err
    for proc in procs:
        proc.join()
    latencies.sort()
    rate = len(latencies) / LOOKUP_SECONDS
    p50 = latencies[len(latencies) // 2] / 1e6
    p99 = latencies[int(len(latencies) * 0.99)] / 1e6
    return rate, p50, p99, errors


def _creator(sock_path: str, names: list[str], out) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    f = s.makefile("rwb")
    f.write(b"H3\t2\t0\t\tauth\n")
    created = 0
    for addr in names:
        f.write(f'Lshared/passdb/{esc("new-password-1")}"{esc(addr)}\t{addr}\n'.encode())
        f.flush()
        if f.readline().startswith(b"O"):
            created += 1
    out.send(created)
    s.close()


def measure_creations(sock_path: str) -> tuple[float, int]:
    ctx = multiprocessing.get_context("fork")
    names = [f"new{i:05d}@{DOMAIN}" for i in range(CREATIONS)]
    pipes, procs = [], []
    start = time.perf_counter()
    for c in range(CREATE_CONNECTIONS):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_creator, args=(sock_path, names[c::CREATE_CONNECTIONS], send))
        proc.start()
        pipes.append(recv)
        procs.append(proc)
    created = sum(recv.recv() for recv in pipes)
    elapsed = time.perf_counter() - start
    for proc in procs:
        proc.join()
    return created / elapsed, created


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-doveauth-") as tmp:
        tmpdir = Path(tmp)
        sock = tmpdir / "doveauth.socket"
        ini = write_config(
            tmpdir / "chatmail.ini",
            mail_domain=DOMAIN,
            mailboxes_dir=tmpdir / "mail",
            nocreate_file=tmpdir / "nocreate",
            doveauth_socket=sock,
            doveauth_http_socket=tmpdir / "doveauth-http.socket",
            max_load_1m=10000,
            min_available_memory="1M",
            min_free_disk_space="1M",
            username_min_length=3,
            username_max_length=32,
        )
        store = AccountStore(read_config(ini))
        stored = hash_password("bench-password")
        for i in range(ACCOUNTS):
            store.create(f"user{i:05d}@{DOMAIN}", stored, password_is_hash=True)
        log = open(tmpdir / "doveauth.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatmaild.doveauth", "--config", str(ini)],
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("doveauth did not start")
                time.sleep(0.05)
            time.sleep(0.5)
            print(f"doveauth_rss_idle_start: {rss_mb(proc.pid):.1f} MB (target < 40)", flush=True)

            cpu_before = cpu_seconds(proc.pid)
            rate, p50, p99, errors = measure_lookups(str(sock))
            cpu = cpu_seconds(proc.pid) - cpu_before
            print(f"lookups_per_second: {rate:.0f} /s (target >= 20000, 50 connections)")
            # independent of other load on the machine: what one core could serve
            per_lookup = cpu / (rate * LOOKUP_SECONDS) * 1e6
            print(f"doveauth_cpu_per_lookup: {per_lookup:.1f} us")
            print(f"lookups_per_cpu_second: {1e6 / per_lookup:.0f} /s")
            print(f"lookup_latency_p50: {p50:.2f} ms")
            print(f"lookup_latency_p99: {p99:.2f} ms (target < 5)")
            print(f"lookup_errors: {errors} count")

            rate, created = measure_creations(str(sock))
            print(f"creations_per_second: {rate:.0f} /s (target >= 200, {created} accounts)")
            if created != CREATIONS:
                print(f"creation_shortfall: {CREATIONS - created} count")

            time.sleep(1.0)
            print(f"doveauth_rss_idle_after_load: {rss_mb(proc.pid):.1f} MB (target < 40)")
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
        os.sync()


if __name__ == "__main__":
    main()
