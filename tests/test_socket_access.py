"""Who may connect to the mail path's local endpoints: each only by its one client.

filtermail's four sockets (the submission and port-25 proxy filters, the
bounce-signing milter, the remote-delivery transport) are there for Postfix;
Postfix's two re-injection smtpd services are there for filtermail; Dovecot's
userdb socket is there for its LMTP service, its default LMTP socket for nobody
but root, and doveauth's dict socket for Dovecot's auth-worker.  Anybody else who reached one could
submit mail as any sender, have it DKIM-signed with the relay's key, get
unencrypted mail with a forged From past filtermail into a mailbox, create
accounts and try passwords unthrottled, or list every account.  So another local user
(here ``nobody``) must be refused by the kernel (EACCES), while the intended
client, with exactly the credentials the production units give it, connects.
"""

from __future__ import annotations

import grp
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from chatmaild.filtermail.main import postfix_access_problem
from chatmaild.relay import Relay
from tests.fixtures.relay import RelayPool

pytestmark = [pytest.mark.postfix, pytest.mark.timeout(120)]

# run as another user: only the standard library of Debian's interpreter
PROBE = """
import errno, socket, sys
target = sys.argv[1]
if target.startswith("/"):
    sock, addr = socket.socket(socket.AF_UNIX), target
else:
    host, port = target.rsplit(":", 1)
    sock, addr = socket.socket(), (host, int(port))
sock.settimeout(10)
try:
    sock.connect(addr)
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
    raise SystemExit(0)
sock.settimeout(2)
try:
    print("connected", sock.recv(64).decode(errors="replace").strip())
except TimeoutError:
    print("connected")
"""

NOBODY = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"]
POSTFIX = ["--reuid=postfix", "--regid=postfix", "--clear-groups"]
# what systemd gives filtermail outgoing/incoming: User=vmail, SupplementaryGroups=postdrop
FILTERMAIL = ["--reuid=vmail", "--regid=vmail", "--groups=postdrop"]
# the other vmail daemons (doveauth, newemail, ...) and Dovecot's mail processes
VMAIL_ONLY = ["--reuid=vmail", "--regid=vmail", "--clear-groups"]

# Relay.ports name, or dovecot/<socket in its base_dir> -> (its one client, whether
# it greets with 220); Dovecot's LMTP clients use the socket in Postfix's private/
ENDPOINTS = {
    "filtermail": (POSTFIX, True),
    "filtermail_incoming": (POSTFIX, True),
    "filtermail_milter": (POSTFIX, False),
    "filtermail_transport": (POSTFIX, True),  # LMTP: greets with 220
    "reinject": (FILTERMAIL, True),
    "reinject_incoming": (FILTERMAIL, True),
    "dovecot/auth-userdb": (VMAIL_ONLY, False),
    "doveauth": (VMAIL_ONLY, False),  # for Dovecot's auth-worker
}

# an operator's chatmail.ini from the time these were loopback ports must still start
OLD_KEYS = {
    "filtermail_host": "127.0.0.1",
    "filtermail_smtp_port": 10080,
    "filtermail_smtp_port_incoming": 10081,
    "filtermail_milter_port": 10084,
    "postfix_host": "127.0.0.1",
    "postfix_reinject_port": 10025,
    "postfix_reinject_port_incoming": 10026,
}


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    pool = RelayPool()
    try:
        yield pool(OLD_KEYS, components=["postfix", "dovecot", "doveauth", "filtermail"])
    finally:
        pool.close()


def target(relay: Relay, name: str) -> str:
    if name == "doveauth":
        return relay.config.doveauth_socket
    if name.startswith("dovecot/"):
        return str(relay.layout.dovecot_base_dir / name.removeprefix("dovecot/"))
    where = relay.ports[name]
    return where if isinstance(where, str) else f"127.0.0.1:{where}"


def probe(credentials: list[str], where: str) -> str:
    """What a connection attempt as ``credentials`` (setpriv options) gives."""
    res = subprocess.run(
        ["setpriv", *credentials, "/usr/bin/python3", "-I", "-c", PROBE, where],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.parametrize("name", ENDPOINTS)
def test_other_local_user_is_refused(relay, name):
    assert probe(NOBODY, target(relay, name)) == "EACCES"


@pytest.mark.parametrize("name", [n for n, (client, _) in ENDPOINTS.items() if client])
def test_intended_client_connects(relay, name):
    client, greets = ENDPOINTS[name]
    assert client is not None
    answer = probe(client, target(relay, name))
    assert answer.startswith("connected"), answer
    if greets:
        assert answer.startswith("connected 220 "), answer


@pytest.mark.parametrize("name", ["reinject", "reinject_incoming"])
def test_vmail_alone_cannot_deliver_around_filtermail(relay, name):
    """vmail without filtermail's group (doveauth, newemail, Dovecot's mail processes)."""
    assert probe(VMAIL_ONLY, target(relay, name)) == "EACCES"


def test_old_port_keys_start_with_a_warning(relay):
    log = (relay.log_dir / "filtermail.log").read_text()
    assert "no longer used" in log and "filtermail_smtp_port (see filtermail_smtp_socket)" in log


def test_filtermail_finds_its_sockets_reachable_for_postfix(relay):
    # one process serves the three roles; none of their sockets is out of Postfix's reach
    log = (relay.log_dir / "filtermail.log").read_text()
    assert "listening on" in log and "Postfix cannot connect" not in log


def test_access_problem_named_when_the_directory_is_not_setgid_postfix(tmp_path):
    """What filtermail warns about at start: a socket Postfix could not reach."""
    postfix_gid = grp.getgrnam("postfix").gr_gid
    sock_dir = tmp_path / "filtermail"
    sock_dir.mkdir()
    os.chown(sock_dir, -1, postfix_gid)
    os.chmod(sock_dir, 0o2750)
    path = str(sock_dir / "outgoing.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        os.chmod(path, 0o660)
        assert postfix_access_problem(path, postfix_gid) is None
        os.chmod(sock_dir, 0o2700)  # Postfix may not enter
        assert "Postfix cannot connect" in (postfix_access_problem(path, postfix_gid) or "")
        os.chmod(sock_dir, 0o2750)
        os.chown(path, -1, 0)  # as created in a directory without the setgid bit
        problem = postfix_access_problem(path, postfix_gid) or ""
        assert f"{path} (socket group id 0, mode 660" in problem
        assert "install -d -o vmail -g postfix -m 2750" in problem
