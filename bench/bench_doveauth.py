"""doveauth throughput: lookups of existing accounts, account creations, idle memory.

1. The real doveauth daemon on sockets in a temp dir, driven the way Dovecot
   drives it: over the dict protocol (Dovecot 2.3: HELLO, then LOOKUP lines,
   one outstanding request per connection) and over HTTP (Dovecot 2.4's Lua
   passdb/userdb: kept-alive connections, one request in flight each).  Load
   comes from separate client processes so the daemon's own event loop is
   what is measured.
2. The whole path through this machine's Dovecot (dict on 2.3, Lua + HTTP on
   2.4): SASL PLAIN authentications on Dovecot's auth socket (passdb; Dovecot
   verifies the SHA512-CRYPT hash itself), first logins that create accounts,
   and userdb lookups on the auth-userdb socket (what LMTP asks).

Targets (issue 2, on a 2-core machine): >= 20,000 lookups/s over 50
connections with p99 < 5 ms; >= 200 creations/s; RSS < 40 MB at idle.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.proc import rss_mb
from chatmaild.common.accounts import AccountStore, hash_password
from chatmaild.common.config import read_config, write_config
from testing.authhttpclient import AuthHttpClient

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


def measure_lookups(sock_path: str, client=None) -> tuple[float, float, float, int]:
    client = client or _client
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    per = CONNECTIONS // CLIENT_PROCS
    for p in range(CLIENT_PROCS):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=client, args=(sock_path, per, LOOKUP_SECONDS, p * 7919, send))
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
    latencies: list[int] = []
    for addr in names:
        t0 = time.perf_counter_ns()
        f.write(f'Lshared/passdb/{esc("new-password-1")}"{esc(addr)}\t{addr}\n'.encode())
        f.flush()
        if f.readline().startswith(b"O"):
            created += 1
        latencies.append(time.perf_counter_ns() - t0)
    out.send((created, latencies))
    s.close()


def measure_creations(
    sock_path: str, creator=None, prefix: str = "new"
) -> tuple[float, int, float, float]:
    """Creations per second over CREATE_CONNECTIONS connections, count, p50 and p99 in ms."""
    creator = creator or _creator
    ctx = multiprocessing.get_context("fork")
    names = [f"{prefix}{i:05d}@{DOMAIN}" for i in range(CREATIONS)]
    pipes, procs = [], []
    start = time.perf_counter()
    for c in range(CREATE_CONNECTIONS):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=creator, args=(sock_path, names[c::CREATE_CONNECTIONS], send))
        proc.start()
        pipes.append(recv)
        procs.append(proc)
    results = [recv.recv() for recv in pipes]
    elapsed = time.perf_counter() - start
    for proc in procs:
        proc.join()
    created = sum(r[0] for r in results)
    latencies = sorted(lat for r in results for lat in r[1])
    p50 = latencies[len(latencies) // 2] / 1e6
    p99 = latencies[int(len(latencies) * 0.99)] / 1e6
    return created / elapsed, created, p50, p99


def _http_request(i: int) -> bytes:
    """The request auth.lua sends for lookup ``i`` (passdb and userdb alternate)."""
    addr = f"user{i % ACCOUNTS:05d}@{DOMAIN}"
    if i % 2:
        body = f"user={addr.replace('@', '%40')}"
        path = "/userdb"
    else:
        body = f"user={addr.replace('@', '%40')}&password=bench-password"
        path = "/passdb"
    return (
        f"POST http://doveauth{path} HTTP/1.1\r\nHost: doveauth\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def _http_client(sock_path: str, nconn: int, seconds: float, offset: int, out) -> None:
    """Like _client, over HTTP: one request in flight per kept-alive connection."""
    sel = selectors.DefaultSelector()
    latencies: list[int] = []
    errors = 0
    i = offset
    for n in range(nconn):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, data=[n, b"", time.perf_counter_ns()])
        s.send(_http_request(i))
        i += 1
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=1.0):
            s, state = key.fileobj, key.data
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("doveauth closed an HTTP connection")
            state[1] += chunk
            while b"\r\n\r\n" in state[1]:
                head, _, rest = state[1].partition(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
                if len(rest) < length:
                    break
                body, state[1] = rest[:length], rest[length:]
                latencies.append(time.perf_counter_ns() - state[2])
                if not head.startswith(b"HTTP/1.1 200") or not body.startswith(b"result=ok"):
                    errors += 1
                state[2] = time.perf_counter_ns()
                s.send(_http_request(i))
                i += 1
    out.send((latencies, errors))
    for key in list(sel.get_map().values()):
        key.fileobj.close()


def _http_creator(sock_path: str, names: list[str], out) -> None:
    created = 0
    latencies: list[int] = []
    with AuthHttpClient(sock_path) as client:
        for addr in names:
            t0 = time.perf_counter_ns()
            if client.passdb(addr, "new-password-1")["result"] == "ok":
                created += 1
            latencies.append(time.perf_counter_ns() - t0)
    out.send((created, latencies))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report_creations(proc: subprocess.Popen, name: str, path: Path, creator, prefix: str,
                     where: str = "", rounds: int = 1) -> float:  # fmt: skip
    """Measure creations ``rounds`` times (fresh addresses each); print and return the median."""
    cpu_before = cpu_seconds(proc.pid)
    runs = sorted(
        measure_creations(str(path), creator, f"{prefix}{r}x" if rounds > 1 else prefix)
        for r in range(rounds)
    )
    cpu = cpu_seconds(proc.pid) - cpu_before
    rate, created, p50, p99 = runs[len(runs) // 2]
    spread = f"median of {rounds}: {runs[0][0]:.0f}-{runs[-1][0]:.0f}; " if rounds > 1 else ""
    print(
        f"{name}creations_per_second{where}: {rate:.0f} /s "
        f"({spread}target >= 331; {created} accounts, {CREATE_CONNECTIONS} connections)"
    )
    print(f"{name}creation_latency_p50{where}: {p50:.2f} ms, p99: {p99:.2f} ms")
    # load-independent: the daemon's CPU per account (SHA512-CRYPT alone is ~2 ms)
    total = sum(r[1] for r in runs)
    print(f"{name}doveauth_cpu_per_creation{where}: {cpu / max(total, 1) * 1e3:.2f} ms")
    if total != CREATIONS * rounds:
        print(f"{name}creation_shortfall{where}: {CREATIONS * rounds - total} count")
    return rate


def report_daemon(proc: subprocess.Popen, sock: Path, http_sock: Path) -> None:
    print(f"doveauth_rss_idle_start: {rss_mb(proc.pid):.1f} MB (target < 40)", flush=True)
    for name, path, client, creator, prefix in _protocols(sock, http_sock):
        cpu_before = cpu_seconds(proc.pid)
        rate, p50, p99, errors = measure_lookups(str(path), client)
        cpu = cpu_seconds(proc.pid) - cpu_before
        print(f"{name}lookups_per_second: {rate:.0f} /s (target >= 20000, 50 connections)")
        # independent of other load on the machine: what one core could serve
        per_lookup = cpu / (rate * LOOKUP_SECONDS) * 1e6
        print(f"{name}doveauth_cpu_per_lookup: {per_lookup:.1f} us")
        print(f"{name}lookups_per_cpu_second: {1e6 / per_lookup:.0f} /s")
        print(f"{name}lookup_latency_p50: {p50:.2f} ms")
        print(f"{name}lookup_latency_p99: {p99:.2f} ms (target < 5)")
        print(f"{name}lookup_errors: {errors} count")
        report_creations(proc, name, path, creator, prefix)
    time.sleep(1.0)
    print(f"doveauth_rss_idle_after_load: {rss_mb(proc.pid):.1f} MB (target < 40)")


def _protocols(sock: Path, http_sock: Path) -> tuple:
    return (
        ("", sock, _client, _creator, "new"),  # dict protocol (Dovecot 2.3)
        ("http_", http_sock, _http_client, _http_creator, "newh"),  # HTTP (Dovecot 2.4's Lua)
    )


def main() -> None:
    bench_daemon()
    bench_creations_on_fresh_ext4()
    bench_creations_against_reference()
    bench_through_dovecot()


@contextlib.contextmanager
def doveauth_daemon(mail_root: Path | None = None, accounts: int = ACCOUNTS):
    """doveauth on sockets in a temp dir, its accounts below ``mail_root`` (default:
    that temp dir); yields (process, dict socket, HTTP socket)."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-doveauth-") as tmp,
        _doveauth_in(Path(tmp), mail_root or Path(tmp), accounts) as started,
    ):
        yield started


@contextlib.contextmanager
def _doveauth_in(tmpdir: Path, mail_root: Path, accounts: int):
    sock = tmpdir / "doveauth.socket"
    http_sock = tmpdir / "doveauth-http.socket"
    ini = write_config(
        tmpdir / "chatmail.ini",
        mail_domain=DOMAIN,
        mailboxes_dir=mail_root / "mail",
        nocreate_file=tmpdir / "nocreate",
        doveauth_socket=sock,
        doveauth_http_socket=http_sock,
        max_load_1m=10000,
        min_available_memory="1M",
        min_free_disk_space="1M",
        username_min_length=3,
        username_max_length=32,
    )
    store = AccountStore(read_config(ini))
    stored = hash_password("bench-password")
    for i in range(accounts):
        store.create(f"user{i:05d}@{DOMAIN}", stored, password_is_hash=True)
    cmd = [sys.executable, "-m", "chatmaild.dictd.doveauth", "--config", str(ini)]
    with _serving(cmd, tmpdir / "doveauth.log", (sock, http_sock)) as proc:
        yield proc, sock, http_sock


@contextlib.contextmanager
def _serving(cmd: list[str], log_path: Path, sockets: tuple[Path, ...], **popen):
    """Start the daemon ``cmd`` (output to ``log_path``), yield it once all its
    ``sockets`` exist; terminate it however the block ends, then sync the disks."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, **popen)
        try:
            deadline = time.monotonic() + 20
            while not all(sock.exists() for sock in sockets):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start (see {log_path})")
                time.sleep(0.05)
            time.sleep(0.5)
            yield proc
        finally:
            proc.terminate()
            proc.wait(30)
    os.sync()


def bench_daemon() -> None:
    with doveauth_daemon() as (proc, sock, http_sock):
        report_daemon(proc, sock, http_sock)


FRESH_EXT4_ENV = "CHATMAIL_BENCH_FRESH_EXT4"  # an empty, freshly made ext4 to use instead


@contextlib.contextmanager
def fresh_ext4(size_mb: int = 1024):
    """A new ext4 made by mkfs.ext4's defaults (with a journal, as on a new Debian
    server), loop-mounted; None where this machine cannot (not root, no loop device).

    The temp directory's filesystem may be anything: this machine's root ext4 has
    no journal, and there every new inode is found by scanning past recently
    deleted ones (perf: most of a creation's kernel time).  With
    CHATMAIL_BENCH_FRESH_EXT4 set, a directory below that path is used instead.
    """
    given = os.environ.get(FRESH_EXT4_ENV)
    if given:  # made by whoever set it (a container has no loop devices)
        with tempfile.TemporaryDirectory(prefix="bench-ext4-", dir=given) as below:
            yield Path(below)
        return
    base = Path(tempfile.mkdtemp(prefix="bench-ext4-", dir="/var/tmp"))
    image, mnt = base / "fs.img", base / "mnt"
    mounted = False
    try:
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True,
                       capture_output=True)  # fmt: skip
        mounted = True
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or str(e).encode()
        print(f"fresh_ext4: cannot make one here: {detail.decode(errors='replace').strip()}")
    try:
        yield mnt if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(base, ignore_errors=True)


FRESH_ROUNDS = 3


def bench_creations_on_fresh_ext4() -> None:
    """Creations again with the accounts on a new, standard ext4 (same daemon, same load)."""
    with fresh_ext4() as mnt:
        if mnt is None:
            return
        with doveauth_daemon(mnt) as (proc, sock, http_sock):
            for name, path, _, creator, prefix in _protocols(sock, http_sock):
                report_creations(proc, name, path, creator, prefix, "_fresh_ext4", FRESH_ROUNDS)


# ---------------------------------------------------------------- side by side with the reference

REFERENCE_ENV = "CHATMAIL_REFERENCE_DOVEAUTH"


@contextlib.contextmanager
def reference_doveauth(executable: str, mail_root: Path):
    """The reference relay's doveauth (``doveauth SOCKET INI``, dict protocol only) with
    the same limits as ours; yields (process, socket)."""
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        tmpdir = Path(tmp)
        (mail_root / "mail").mkdir(exist_ok=True)
        ini = tmpdir / "chatmail.ini"
        ini.write_text(
            f"[params]\nmail_domain = {DOMAIN}\nmailboxes_dir = {mail_root / 'mail'}\n"
            f"passdb_path = {tmpdir / 'passdb.sqlite'}\n"
            "username_min_length = 3\nusername_max_length = 32\nmax_load_1m = 10000\n"
            "min_available_memory = 1M\nmin_free_disk_space = 1M\n"
        )
        sock = tmpdir / "doveauth.socket"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not our package
        cmd = [executable, str(sock), str(ini)]
        with _serving(cmd, tmpdir / "doveauth.log", (sock,), env=env, cwd="/") as proc:
            yield proc, sock


def bench_creations_against_reference() -> None:
    """With CHATMAIL_REFERENCE_DOVEAUTH set to the reference relay's ``doveauth``
    executable: both daemons, taking turns, each on its own fresh ext4, same client."""
    executable = os.environ.get(REFERENCE_ENV)
    if not executable:
        print(f"reference_creations: not measured (set {REFERENCE_ENV} to its doveauth)")
        return
    rates: dict[str, list[float]] = {"ours": [], "reference": []}
    pair = ("ours", "reference")
    # taking turns, each one first every other round: ours, ref, ref, ours, ...
    order = [kind for r in range(FRESH_ROUNDS) for kind in (pair if r % 2 == 0 else pair[::-1])]
    for kind in order:
        with fresh_ext4() as mnt:
            if mnt is None:
                return
            if kind == "ours":
                daemon = doveauth_daemon(mnt, accounts=0)
            else:
                daemon = reference_doveauth(executable, mnt)
            with daemon as started:
                rate, created, _, _ = measure_creations(str(started[1]), _creator, "side")
                rates[kind].append(rate if created == CREATIONS else 0.0)
    medians = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    for kind, rate in medians.items():
        runs = ", ".join(f"{x:.0f}" for x in rates[kind])
        print(f"side_by_side_{kind}_creations_per_second: {rate:.0f} /s (runs: {runs})")
    ratio = medians["ours"] / max(medians["reference"], 1e-9)
    print(f"side_by_side_creations_ratio: {ratio:.2f} x (target >= 1)")


# ---------------------------------------------------------------- through Dovecot

DOVECOT_THREADS = 8
DOVECOT_SECONDS = 8.0
DOVECOT_CREATIONS = 200


class DovecotAuthClient:
    """Dovecot's auth client protocol (what Postfix's SASL and the login processes speak)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.file.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
        self.file.flush()
        while self.file.readline().rstrip(b"\n") != b"DONE":
            pass
        self.next_id = 1

    def plain(self, user: str, password: str) -> bool:
        import base64

        resp = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.next_id += 1
        self.file.write(
            # secured: as Postfix says for a TLS session (cleartext auth is refused otherwise)
            f"AUTH\t{self.next_id}\tPLAIN\tservice=smtp\tsecured\tnologin\tresp={resp}\n".encode()
        )
        self.file.flush()
        reply = self.file.readline()
        return reply.startswith(b"OK\t")

    def close(self) -> None:
        self.sock.close()


class DovecotUserdbClient:
    """The auth master protocol on auth-userdb (what LMTP asks for every recipient)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.file.write(b"VERSION\t1\t0\n")
        self.file.flush()
        self.file.readline()  # VERSION
        self.file.readline()  # SPID
        self.next_id = 1

    def user(self, user: str) -> bool:
        self.next_id += 1
        self.file.write(f"USER\t{self.next_id}\t{user}\tservice=lmtp\n".encode())
        self.file.flush()
        return self.file.readline().startswith(b"USER\t")

    def close(self) -> None:
        self.sock.close()


def _threads(work, count: int) -> list:
    import threading

    results: list = [None] * count

    def run(n: int) -> None:
        results[n] = work(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _timed_loop(make_client, call, names: list[str]) -> tuple[float, float, float, int]:
    """Calls per second over DOVECOT_THREADS connections for DOVECOT_SECONDS, p50, p90."""

    def work(n: int) -> tuple[list[int], int]:
        client = make_client()
        latencies, errors, i = [], 0, n
        deadline = time.perf_counter() + DOVECOT_SECONDS
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter_ns()
                if not call(client, names[i % len(names)]):
                    errors += 1
                latencies.append(time.perf_counter_ns() - t0)
                i += DOVECOT_THREADS
        finally:
            client.close()
        return latencies, errors

    results = _threads(work, DOVECOT_THREADS)
    latencies = sorted(lat for r in results for lat in r[0])
    errors = sum(r[1] for r in results)
    return (
        len(latencies) / DOVECOT_SECONDS,
        latencies[len(latencies) // 2] / 1e6,
        latencies[int(len(latencies) * 0.9)] / 1e6,
        errors,
    )


def bench_through_dovecot() -> None:
    import shutil

    from chatmaild.relay import Relay
    from chatmaild.relay.dovecotversion import dovecot_version, installed_series

    state = Path(tempfile.mkdtemp(prefix="bench-auth-", dir="/tmp"))
    state.chmod(0o755)  # the servers and vmail traverse it
    try:
        with Relay(state, None, ["postfix", "dovecot", "doveauth"]) as relay:
            via = "dict" if installed_series() == "2.3" else "Lua + HTTP"
            print(f"dovecot: {dovecot_version()} (passdb/userdb via {via})")
            auth_sock = relay.layout.postfix_queue_dir / "private/auth"
            userdb_sock = relay.layout.dovecot_base_dir / "auth-userdb"
            # localparts of the default length (username_min/max_length = 9)
            names = [f"dc{i:07d}@{relay.mail_domain}" for i in range(DOVECOT_CREATIONS)]

            def create(n: int) -> int:
                client = DovecotAuthClient(auth_sock)
                try:
                    return sum(
                        client.plain(addr, "bench-password") for addr in names[n::DOVECOT_THREADS]
                    )
                finally:
                    client.close()

            start = time.perf_counter()
            created = sum(_threads(create, DOVECOT_THREADS))
            elapsed = time.perf_counter() - start
            print(
                f"dovecot_first_logins_per_second: {created / elapsed:.0f} /s "
                f"({created} of {len(names)} accounts created, {DOVECOT_THREADS} connections)"
            )
            rate, p50, p90, errors = _timed_loop(
                lambda: DovecotAuthClient(auth_sock),
                lambda c, addr: c.plain(addr, "bench-password"),
                names,
            )
            print(f"dovecot_logins_per_second: {rate:.0f} /s (existing accounts, SASL PLAIN)")
            print(f"dovecot_login_latency_p50: {p50:.2f} ms, p90: {p90:.2f} ms")
            print(f"dovecot_login_errors: {errors} count")
            rate, p50, p90, errors = _timed_loop(
                lambda: DovecotUserdbClient(userdb_sock), lambda c, addr: c.user(addr), names
            )
            print(f"dovecot_userdb_lookups_per_second: {rate:.0f} /s (auth-userdb, as LMTP)")
            print(f"dovecot_userdb_latency_p50: {p50:.2f} ms, p90: {p90:.2f} ms")
            print(f"dovecot_userdb_errors: {errors} count")
    finally:
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
