"""One process serving several roles (issue 11): each on its own socket, isolated
from the others' failures, READY once all listen, log lines naming the role."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatmaild.filtermail.dkim import generate_key
from testing.authhttpclient import AuthHttpClient
from testing.rawdict import RawDictClient, wait_for_socket
from tests.fixtures.dict import child_env, write_test_ini

MAX_RECIPIENTS_KEY = "shared/x/vendor/vendor.dovecot/pvt/server/vendor/deltachat/maxsmtprecipients"


def ask(path: Path, line: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(line.encode() + b"\n")
        return s.makefile("rb").readline().decode()


@pytest.fixture
def roles(tmp_path):
    """Start testing.roledaemons (role-a, role-b in one process); SIGTERM must end it with 0."""
    started: list[subprocess.Popen] = []

    def start(*args: str, env: dict | None = None) -> subprocess.Popen:
        ini = write_test_ini(tmp_path)
        log = open(tmp_path / "roles.log", "wb")  # noqa: SIM115 (the child keeps it)
        cmd = [sys.executable, "-m", "testing.roledaemons", "--config", str(ini),
               "--dir", str(tmp_path), *args]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env or child_env())
        log.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, (tmp_path / "roles.log").read_text()


def test_a_failing_handler_closes_only_its_connection(roles, tmp_path):
    proc = roles()
    a, b = tmp_path / "role-a.sock", tmp_path / "role-b.sock"
    wait_for_socket(a, proc=proc)
    wait_for_socket(b, proc=proc)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as broken:
        broken.settimeout(10)
        broken.connect(str(a))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.settimeout(10)
            other.connect(str(b))  # a connection of the other role, open meanwhile
            broken.sendall(b"boom\n")
            assert broken.recv(100) == b""  # the failing role's connection is closed
            other.sendall(b"still there\n")
            assert other.recv(100) == b"role-b: still there\n"
    assert proc.poll() is None
    assert ask(a, "again") == "role-a: again\n"  # and the failing role serves on
    assert ask(b, "hello") == "role-b: hello\n"
    log = (tmp_path / "roles.log").read_text()
    # each line names the role that wrote it, not only the process
    assert f"role-a[{proc.pid}] ERROR connection handler failed" in log, log
    assert "RuntimeError: role-a: handler failure requested by the test" in log
    assert f"role-b[{proc.pid}] INFO answered hello" in log, log
    assert f"role-a[{proc.pid}] INFO answered again" in log, log


def test_ready_only_when_every_role_listens(roles, tmp_path):
    notify_path = tmp_path / "notify.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        proc = roles("--hold", env=child_env(NOTIFY_SOCKET=str(notify_path)))
        a = tmp_path / "role-a.sock"
        wait_for_socket(a, proc=proc)
        assert ask(a, "first") == "role-a: first\n"  # role-a serves while role-b starts
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):
            notify.recv(4096)  # no READY=1 yet
        (tmp_path / "go").touch()
        notify.settimeout(20)
        assert "READY=1" in notify.recv(4096).decode()
        assert ask(tmp_path / "role-b.sock", "second") == "role-b: second\n"
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait(30) == 0


def test_listen_names_the_role_when_there_are_several(roles, tmp_path):
    ini = write_test_ini(tmp_path)
    cmd = [sys.executable, "-m", "testing.roledaemons", "--config", str(ini),
           "--dir", str(tmp_path), "--listen", str(tmp_path / "x.sock")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=30)
    assert res.returncode == 2 and "name the role (one of role-a, role-b)" in res.stderr
    res = subprocess.run([*cmd[:-2], "role-c"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "unknown role 'role-c'" in res.stderr
    proc = roles("--listen", f"role-b={tmp_path / 'x.sock'}")
    wait_for_socket(tmp_path / "x.sock", proc=proc)
    assert ask(tmp_path / "x.sock", "moved") == "role-b: moved\n"
    wait_for_socket(tmp_path / "role-a.sock", proc=proc)  # the other one stays put
    assert not (tmp_path / "role-b.sock").exists()


def test_filtermail_serves_its_three_roles_from_one_process(tmp_path):
    """The installed layout: outgoing, incoming and milter in one process, each on its socket."""
    key, _ = generate_key()
    (tmp_path / "dkim.key").write_bytes(key)
    socks = {r: tmp_path / f"{r}.sock" for r in ("outgoing", "incoming", "milter")}
    ini = write_test_ini(
        tmp_path,
        dkim_key_path=tmp_path / "dkim.key",
        filtermail_smtp_socket=socks["outgoing"],
        filtermail_smtp_socket_incoming=socks["incoming"],
        filtermail_milter_socket=socks["milter"],
    )
    notify_path = tmp_path / "notify.socket"
    log = open(tmp_path / "filtermail.log", "wb")  # noqa: SIM115
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(30)
        cmd = [sys.executable, "-m", "chatmaild.filtermail.main", "--config", str(ini),
               "outgoing", "incoming", "milter"]  # fmt: skip
        env = child_env(NOTIFY_SOCKET=str(notify_path))
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        try:
            assert "READY=1" in notify.recv(4096).decode()
            for role in ("outgoing", "incoming"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(10)
                    s.connect(str(socks[role]))  # READY: every role listens already
                    assert s.makefile("rb").readline().startswith(b"220 "), role
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(socks["milter"]))
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
            log.close()
    text = (tmp_path / "filtermail.log").read_text()
    assert rc == 0, text
    for role, name in (("outgoing", "filtermail"), ("incoming", "filtermail-incoming"),
                       ("milter", "filtermail-milter")):  # fmt: skip
        assert f"{name}[{proc.pid}] INFO listening on {socks[role]}" in text, text
    assert not any(p.exists() for p in socks.values())  # the files it bound are gone


def test_dict_roles_answer_from_one_process(daemon_factory, tmp_path):
    """chatmail-dict: doveauth, lastlogin and metadata, each on its own socket, one pid."""
    ini = write_test_ini(
        tmp_path,
        lastlogin_socket=tmp_path / "lastlogin.socket",
        metadata_socket=tmp_path / "metadata.socket",
    )
    (tmp_path / "mail").mkdir()
    daemon = daemon_factory(
        "chatmaild.dictd.main", ini=ini, args=["doveauth", "lastlogin", "metadata"]
    )
    for name in ("doveauth", "lastlogin", "metadata"):
        wait_for_socket(tmp_path / f"{name}.socket", proc=daemon.proc)
    user = "alice123x@example.org"
    with RawDictClient(tmp_path / "metadata.socket") as c:
        assert c.lookup(MAX_RECIPIENTS_KEY, user) == "O1000"
    with RawDictClient(tmp_path / "lastlogin.socket") as c:
        assert c.lookup(f"shared/last-login/{user}", user) == "N"
    with RawDictClient(tmp_path / "doveauth.socket") as c:
        assert c.lookup("shared/userdb/nobody@other.example") == "N"  # not our domain
    log = daemon.log()
    for name in ("doveauth", "chatmail-lastlogin", "chatmail-metadata"):
        assert f"{name}[{daemon.pid}] INFO listening on" in log, log


def test_an_unreachable_notify_socket_stops_nothing(roles, tmp_path):
    """sd_notify to a socket nobody listens on (systemd gone) must not end the daemon."""
    proc = roles(env=child_env(NOTIFY_SOCKET=str(tmp_path / "nobody-listens.socket")))
    wait_for_socket(tmp_path / "role-b.sock", proc=proc)
    assert ask(tmp_path / "role-a.sock", "still") == "role-a: still\n"
    proc.send_signal(signal.SIGTERM)  # STOPPING=1 goes nowhere as well
    assert proc.wait(30) == 0


def test_dict_roles_serve_systemds_sockets_and_lookups_wait_out_a_restart(tmp_path):
    """chatmail-dict.socket: systemd holds the four sockets open (LISTEN_FDS, in the
    unit's ListenStream= order); a lookup made while chatmail-dict restarts waits in
    the listen queue and the next process answers it, instead of failing."""
    names = ["doveauth", "doveauth-http", "lastlogin", "metadata"]
    ini = write_test_ini(
        tmp_path,
        lastlogin_socket=tmp_path / "lastlogin.socket",
        metadata_socket=tmp_path / "metadata.socket",
    )
    (tmp_path / "mail").mkdir()
    listeners = []
    for name in names:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / f"{name}.socket"))
        listener.listen(64)
        listeners.append(listener)
    log = tmp_path / "dict.log"

    def start() -> subprocess.Popen:
        def to_listen_fds() -> None:
            copies = [os.dup(s.fileno()) for s in listeners]  # before 3..6 are overwritten
            for i, fd in enumerate(copies):
                os.dup2(fd, 3 + i)  # inheritable; every other descriptor is not

        # LISTEN_PID must name the daemon itself: the shell exec()s into it
        cmd = [
            "sh",
            "-c",
            f'LISTEN_PID=$$ LISTEN_FDS={len(names)} exec "{sys.executable}" -m '
            f'chatmaild.dictd.main --config "{ini}" doveauth lastlogin metadata',
        ]
        with open(log, "ab") as out:
            return subprocess.Popen(
                cmd, stdout=out, stderr=out, close_fds=False, preexec_fn=to_listen_fds
            )

    def served(proc: subprocess.Popen) -> None:
        with RawDictClient(tmp_path / "lastlogin.socket") as c:
            assert c.lookup("shared/last-login/alice123x@example.org", "a@x") == "N"
        assert proc.poll() is None, log.read_text()

    first = start()
    try:
        served(first)
        with RawDictClient(tmp_path / "metadata.socket") as c:
            assert c.lookup(MAX_RECIPIENTS_KEY, "alice123x@example.org") == "O1000"
        with AuthHttpClient(tmp_path / "doveauth-http.socket") as c:
            unknown = c.userdb("nobody@other.example")  # not our domain
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        # nobody serves: the lookups are made now and wait in the listen queues
        waiting = RawDictClient(tmp_path / "doveauth.socket")
        waiting.send("Lshared/userdb/nobody@other.example")
        waiting_http = AuthHttpClient(tmp_path / "doveauth-http.socket")
        body = b"user=nobody%40other.example"
        waiting_http.send_raw(
            b"POST http://doveauth/userdb HTTP/1.1\r\nHost: doveauth\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        second = start()
        try:
            assert waiting.readline() == "N"
            answer = waiting_http.read_response()
            assert answer is not None and answer.status == 200
            assert answer.form() == unknown
            served(second)
        finally:
            waiting.close()
            waiting_http.close()
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
    # systemd's socket files: left where they are, by both processes
    for name in names:
        assert (tmp_path / f"{name}.socket").exists(), name
    for listener in listeners:
        listener.close()


def test_filtermail_stop_lets_an_open_mail_transaction_end(tmp_path):
    """A graceful stop waits for Postfix's proxy session in its transaction (MAIL until
    the end): the message is answered, not cut off (Postfix would answer 451)."""
    key, _ = generate_key()
    (tmp_path / "dkim.key").write_bytes(key)
    sock = tmp_path / "outgoing.sock"
    ini = write_test_ini(tmp_path, dkim_key_path=tmp_path / "dkim.key",
                         filtermail_smtp_socket=sock)  # fmt: skip
    log = open(tmp_path / "filtermail.log", "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "chatmaild.filtermail.main", "--config", str(ini), "outgoing"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=child_env())
    try:
        wait_for_socket(sock, proc=proc)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(str(sock))
            lines = s.makefile("rb")
            assert lines.readline().startswith(b"220 ")

            def say(command: bytes) -> bytes:
                s.sendall(command + b"\r\n")
                reply = lines.readline()
                while reply[3:4] == b"-":
                    reply = lines.readline()
                return reply

            assert say(b"EHLO localhost").startswith(b"250 ")
            assert say(b"MAIL FROM:<alice123x@example.org>").startswith(b"250")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # waits for the transaction
            assert say(b"RCPT TO:<bob123xy@example.org>").startswith(b"250")
            assert say(b"RSET").startswith(b"250")  # the transaction ends: so does the stop
            assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
