"""`make run` (python -m chatmaild.relay): ready line, relay.json, overrides, clean stop."""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from chatmaild.relay import client_tls_context
from tests.sandbox import world_readable_tempdir

pytestmark = [pytest.mark.relay, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[1]


def start_dev(state: Path, *args: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatmaild.relay", "--state", str(state), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if "Ctrl-C stops" in line:
            return proc, lines
    raise AssertionError(f"exited {proc.wait()} before ready:\n" + "\n".join(lines))


def imap_login(ports: dict, addr: str, password: str) -> None:
    conn = imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=client_tls_context())
    conn.login(addr, password)
    conn.logout()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def base():
    d = world_readable_tempdir("run-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_make_run_with_config_override(base):
    state = base / "state"
    cfg = base / "second.ini"
    cfg.write_text("[params]\nmail_domain = second.example\nmax_user_send_per_minute = 77\n")
    proc, lines = start_dev(state, "--config", str(cfg))
    try:
        facts = json.loads((state / "relay.json").read_text())
        assert facts["mail_domain"] == "second.example"
        assert facts["config"] == str(state / "etc/chatmail.ini")
        assert "max_user_send_per_minute = 77" in Path(facts["config"]).read_text()
        ports = facts["ports"]
        assert f"127.0.0.1:{ports['imaps']}" in lines[1]
        [link] = [line.split()[-1] for line in lines if "dclogin:" in line]
        assert any(f"DCACCOUNT:https://127.0.0.1:{ports['newemail']}/new" in x for x in lines)
        # the printed link logs in (and so creates its account)
        addr, _, query = link.removeprefix("dclogin:").partition("?")
        params = urllib.parse.parse_qs(query)
        assert addr.endswith("@second.example") and params["ip"] == [str(ports["imaps"])]
        imap_login(ports, addr, params["p"][0])
        pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        ours = {p for p in pids if str(state) in _cmdline(p) or _mail_config(p, state)}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "no process of this relay is left" in out
    assert ours and not any(_alive(p) for p in ours)
    for name in ("smtp", "submission", "submissions", "imap", "imaps", "newemail"):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", ports[name])) != 0, name
    assert not (state / "relay.json").exists()

    # a restart keeps the ports (and so the links) and the accounts
    proc, _ = start_dev(state, "--config", str(cfg))
    try:
        again = json.loads((state / "relay.json").read_text())
        assert again["ports"]["imaps"] == ports["imaps"]
        imap_login(again["ports"], addr, params["p"][0])
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _mail_config(pid: int, state: Path) -> bool:
    try:
        return f"MAIL_CONFIG={state}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def test_restart_after_kill_ends_leftovers(base):
    state = base / "state"
    proc, _ = start_dev(state)
    facts = json.loads((state / "relay.json").read_text())
    proc.kill()  # no cleanup at all: the servers and daemons keep running
    proc.wait()
    master = int((state / "postfix/spool/pid/master.pid").read_text().split()[0])
    assert _alive(master)
    proc, lines = start_dev(state)
    try:
        assert any("leftover processes" in line for line in lines)
        assert not _alive(master)
        imap_ports = json.loads((state / "relay.json").read_text())["ports"]
        assert imap_ports["imaps"] == facts["ports"]["imaps"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    left = [p for p in os.listdir("/proc") if p.isdigit() and str(state) in _cmdline(int(p))]
    assert not [p for p in left if _alive(int(p))]
