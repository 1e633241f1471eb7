"""Shared daemon runtime, exercised through a real dict daemon process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from chatmaild.common import service
from testing.rawdict import RawDictClient, wait_for_socket
from tests.fixtures.dict import child_env, write_test_ini

MEMDICT = "testing.memdict"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_finishes_request_in_flight(daemon_factory, tmp_path, sig):
    sock = tmp_path / "d.socket"
    daemon = daemon_factory(MEMDICT, listen=sock)
    client = RawDictClient(sock)
    idle = RawDictClient(sock)  # an idle connection must not delay the stop
    client.send("Lshared/slow/1.5")
    time.sleep(0.4)  # the request is now being served
    daemon.proc.send_signal(sig)
    assert client.readline() == "Oslept"
    assert daemon.proc.wait(30) == 0
    with pytest.raises((EOFError, ConnectionError)):
        idle.request("Lshared/x")
    assert not sock.exists()  # the daemon removes the socket it created
    log = daemon.log()
    assert "stopping" in log and "stopped" in log
    client.close()
    idle.close()


def test_stop_timeout_bounds_the_wait(daemon_factory, tmp_path):
    sock = tmp_path / "d.socket"
    daemon = daemon_factory(MEMDICT, listen=sock, args=["--stop-timeout", "0.5"])
    client = RawDictClient(sock)
    client.send("Lshared/slow/60")
    time.sleep(0.3)
    daemon.proc.terminate()
    assert daemon.proc.wait(20) == 0
    assert "requests still running" in daemon.log()
    client.close()


def test_no_new_connections_after_stop(daemon_factory, tmp_path):
    sock = tmp_path / "d.socket"
    daemon = daemon_factory(MEMDICT, listen=sock)
    client = RawDictClient(sock)
    client.send("Lshared/slow/1.0")
    time.sleep(0.3)
    daemon.proc.terminate()
    time.sleep(0.3)
    with pytest.raises(OSError):
        RawDictClient(sock, timeout=2).lookup("shared/x")
    assert client.readline() == "Oslept"
    assert daemon.proc.wait(30) == 0


def test_stale_socket_is_replaced(daemon_factory, tmp_path):
    sock = tmp_path / "d.socket"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    daemon_factory(MEMDICT, listen=sock)
    with RawDictClient(sock) as client:
        assert client.lookup("shared/x") == "N"


def test_live_socket_is_not_replaced(daemon_factory, tmp_path):
    sock = tmp_path / "d.socket"
    first = daemon_factory(MEMDICT, listen=sock)
    second = daemon_factory(MEMDICT, listen=sock, wait=False)
    assert second.proc.wait(30) == 1
    assert "in use by another process" in second.log()
    with RawDictClient(sock) as client:
        assert client.lookup("shared/x") == "N"
    assert first.proc.poll() is None


def test_regular_file_is_not_replaced(daemon_factory, tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    daemon = daemon_factory(MEMDICT, listen=path, wait=False)
    assert daemon.proc.wait(30) == 1
    assert "is not a socket" in daemon.log()
    assert path.read_text() == "precious"


def test_socket_mode_and_parent_directory(daemon_factory, tmp_path):
    sock = tmp_path / "sub" / "dir" / "d.socket"
    daemon_factory(MEMDICT, listen=sock)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_doveauth_socket_is_owner_only(doveauth):
    _, sock, _ = doveauth
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_tcp_endpoint(daemon_factory, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = daemon_factory(MEMDICT, args=["--listen", f"127.0.0.1:{port}"], wait=False)
    deadline = time.monotonic() + 15
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            assert daemon.proc.poll() is None, daemon.log()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with conn:
        conn.sendall(b"H3\t2\t0\t\tx\nLshared/none\n")
        assert conn.recv(100) == b"N\n"


def test_systemd_socket_activation(tmp_path):
    """LISTEN_FDS: the daemon serves the inherited socket and leaves its file alone."""
    path = tmp_path / "activated.socket"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    ini = write_test_ini(tmp_path)
    fd = listener.fileno()

    def to_fd3():
        os.dup2(fd, 3)

    # LISTEN_PID must name the daemon itself: the shell exec()s into it
    cmd = [
        "sh",
        "-c",
        f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" -m {MEMDICT} --config "{ini}" '
        f'--listen "{tmp_path}/unused.socket"',
    ]
    log = open(tmp_path / "activated.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, pass_fds=(fd, 3), preexec_fn=to_fd3)
    try:
        with RawDictClient(path) as client:  # connect works at once: the backlog holds it
            assert client.lookup("shared/x") == "N"
        assert not (tmp_path / "unused.socket").exists()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        log.close()
    assert path.exists()  # systemd owns the socket file
    listener.close()


def test_sd_notify_ready_and_stopping(daemon_factory, tmp_path):
    notify_path = tmp_path / "notify.socket"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    sock = tmp_path / "d.socket"
    env = child_env(NOTIFY_SOCKET=str(notify_path))
    daemon = daemon_factory(MEMDICT, listen=sock, wait=False, env=env)
    messages = [notify.recv(4096).decode()]
    assert "READY=1" in messages[0]
    wait_for_socket(sock)  # READY means serving
    daemon.proc.terminate()
    messages.append(notify.recv(4096).decode())
    assert "STOPPING=1" in messages[1]
    assert daemon.proc.wait(30) == 0
    notify.close()


def test_config_error_exits_78(daemon_factory, tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[params]\nmail_domain = nodots\n")
    daemon = daemon_factory(MEMDICT, ini=ini, listen=tmp_path / "x.socket", wait=False)
    assert daemon.proc.wait(30) == 78
    assert "mail_domain = 'nodots' is invalid" in daemon.log()


def test_help_reads_like_a_man_page():
    out = subprocess.run(
        [sys.executable, "-m", "chatmaild.dictd.doveauth", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("usage: doveauth")
    for part in ("doveauth - ", "LOG LINES", "FILES", "SIGNALS", "--config", "--listen"):
        assert part in out


def test_thousands_of_idle_connections(daemon_factory, tmp_path):
    """Idle connections cost no request slot: a burst of 3000 all get served."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    sock = tmp_path / "d.socket"
    # a soft limit of 1024 for the daemon: it must raise it itself
    daemon = daemon_factory(
        MEMDICT,
        listen=sock,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
    )
    clients = []
    try:
        for _ in range(3000):
            clients.append(RawDictClient(sock, timeout=30))
        for c in clients[::100]:
            assert c.lookup("shared/x") == "N"
        with RawDictClient(sock) as fresh:
            assert fresh.lookup("shared/y") == "N"
    finally:
        for c in clients:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert daemon.proc.poll() is None


def test_asyncio_reads_stay_below_glibcs_mmap_threshold():
    """asyncio's own loop (the web process's) reads at most 64 KiB at a time: its
    default 256 KiB buffer per read fragmented the heap (issue 24)."""
    service._small_asyncio_reads()
    sizes: list[int] = []

    class Reader(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            sizes.append(len(data))

    async def main() -> None:
        ours, theirs = socket.socketpair()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sender = threading.Thread(target=theirs.sendall, args=(b"x" * 300_000,))
        sender.start()
        await asyncio.sleep(0.2)  # all of it waits in the socket: one read could take it
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(Reader, ours)
        while sum(sizes) < 300_000:
            await asyncio.sleep(0.01)
        sender.join()
        transport.close()
        theirs.close()

    asyncio.run(main())
    assert max(sizes) <= service.ASYNCIO_READ_SIZE < 128 * 1024, sizes
