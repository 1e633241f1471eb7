"""A complete relay in one state directory: real Postfix + Dovecot + our daemons.

``Relay`` is what ``make run`` and the tests use.  It renders the production
templates with a :meth:`Layout.local` layout (everything below the state
directory, every listener on 127.0.0.1, free ports picked at start, no mail
leaves the machine except to explicitly added peer relays), starts:

1. the chatmaild daemons, as the vmail user (``setpriv``), umask 077, from a
   copy of the package staged in the state directory (see :mod:`.staging`);
2. ``postfix -c <dir> check`` (creates ``spool/private`` for Dovecot's sockets),
   then Postfix's ``master -c <dir> -s``;
3. ``dovecot -F -c <file>``;

every one a child process in the foreground, so it can always be stopped, even
when a start fails halfway; waits until every socket answers and writes
``relay.json``.  ``stop()`` ends the servers and daemons and waits until every
process of the relay is gone.  With ``supervise=True`` (``make run``) a daemon
or server that dies is restarted with back-off, like ``Restart=always`` units.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import string
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from ..config import Config, read_config, write_config
from .render import (
    ALL_COMPONENTS,
    DAEMON_MODULES,
    Layout,
    render_all,
    transport_map,
)
from .staging import stage

log = logging.getLogger("chatmaild.relay")

DEFAULT_DOMAIN = "chat.example"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# restart back-off of supervised processes: first delay, doubling up to the cap;
# a process that ran this long before dying starts again from the first delay
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
RESTART_RESET_AFTER = 60.0
SERVERS = ("postfix", "dovecot")
# a process serves several roles (one interpreter and one set of libraries in
# memory instead of one per role), as the units in systemd/ do: "dict" the
# dict daemons, "filtermail" the filters; the web front door ("newemail") is a
# process of its own, so that its public port cannot take time from the filters
DICT_ROLES = ("doveauth", "lastlogin", "metadata")
FILTER_ROLES = ("outgoing", "incoming", "milter")

# ini keys holding a TCP port, and the short names used in Relay.ports
PORT_KEYS = {
    "smtp": "smtp_port",
    "submission": "submission_port",
    "submissions": "submissions_port",
    "imap": "imap_port",
    "imaps": "imaps_port",
    "newemail": "newemail_port",
}
# ini keys holding the filter path's UNIX sockets (a port would be open to every
# local user), also listed in Relay.ports; below Layout.local's queue directory
SOCKET_KEYS = {
    "reinject": "postfix_reinject_socket",
    "reinject_incoming": "postfix_reinject_socket_incoming",
    "filtermail": "filtermail_smtp_socket",
    "filtermail_incoming": "filtermail_smtp_socket_incoming",
    "filtermail_milter": "filtermail_milter_socket",
}
LOCAL_SOCKETS = {
    "postfix_reinject_socket": "postfix/spool/public/reinject",
    "postfix_reinject_socket_incoming": "postfix/spool/public/reinject_incoming",
    "filtermail_smtp_socket": "postfix/spool/filtermail/outgoing.sock",
    "filtermail_smtp_socket_incoming": "postfix/spool/filtermail/incoming.sock",
    "filtermail_milter_socket": "postfix/spool/filtermail/milter.sock",
}


class RelayError(RuntimeError):
    """The relay could not start; the message includes the relevant log tail."""


def available_components() -> tuple[str, ...]:
    """Every component whose code exists in this checkout."""
    have = ["postfix", "dovecot"]
    for name, module in DAEMON_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            have.append(name)
    return tuple(have)


def reserve_ports(count: int, host: str = "127.0.0.1") -> list[socket.socket]:
    """Sockets bound to ``count`` distinct free ports, held until the servers listen.

    Postfix listens with SO_REUSEPORT: two relays given the same port both start
    and the kernel deals connections out between them (seen in CI as "Relay
    access denied" for a relay's own domain).  Ports only picked, then released,
    can be picked again by the next relay before the first one listens.  So the
    port stays bound: bound without SO_REUSEADDR, the kernel picks a port nothing
    else holds and no later pick gets it; SO_REUSEADDR set afterwards lets our
    servers, which all set it, bind and listen there all the same.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def reserve_port(port: int, host: str = "127.0.0.1") -> socket.socket | None:
    """Hold ``port`` as :func:`reserve_ports` does, or None when something listens there.

    SO_REUSEADDR before bind: connections of a previous run in TIME_WAIT do not count.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        return None
    return s


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel says are free right now (distinct, but not held: see reserve_ports)."""
    socks = reserve_ports(count, host)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: ppid follows the last ")"
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> set[int]:
    """``pid`` and all its descendants that exist now."""
    children = _children_map()
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p in found:
            continue
        found.add(p)
        todo.extend(children.get(p, []))
    return {p for p in found if Path(f"/proc/{p}").exists()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: set[int], timeout: float) -> None:
    """Wait until ``pids`` are gone; SIGKILL whatever is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if _alive(p)}
        time.sleep(0.02)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@functools.cache
def _postfix_daemon_directory(config_dir: str) -> str:
    return subprocess.run(
        ["postconf", "-c", config_dir, "-h", "daemon_directory"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} missing)"
    return f"--- {path} (last {lines} lines)\n" + "\n".join(text[-lines:])


def client_tls_context() -> ssl.SSLContext:
    """TLS context for talking to a local relay's self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Relay:
    """One relay (Postfix, Dovecot, chatmaild daemons) living in ``state_dir``.

    ``overrides`` are chatmail.ini keys (``{"mail_domain": "other.example"}``);
    every port not given is picked free.  ``components`` selects what runs
    (default: everything whose code exists, see :func:`available_components`).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike,
        overrides: Mapping[str, object] | None = None,
        components: Iterable[str] | None = None,
        *,
        nodelay: bool | None = None,
        reuse_ports: bool = False,
        supervise: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.components = frozenset(available_components() if components is None else components)
        unknown = self.components - set(ALL_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown relay components: {', '.join(sorted(unknown))}")
        self.overrides = {k: str(v) for k, v in (overrides or {}).items()}
        self.nodelay_requested = nodelay
        self.reuse_ports = reuse_ports
        self.supervise = supervise
        self.etc_dir = self.state_dir / "etc"
        self.ini_path = self.etc_dir / "chatmail.ini"
        self.log_dir = self.state_dir / "log"
        self.run_dir = self.state_dir / "run"
        self.json_path = self.state_dir / "relay.json"
        self.peers: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._started_at: dict[str, float] = {}
        self._lock = threading.Lock()  # _procs: the supervisor restarts, stop() ends
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts: dict[str, int] = {}
        self._started = False
        # our TCP ports, bound until stop() so no other relay picks them meanwhile
        self._reserved: list[socket.socket] = []
        # a killed earlier run may still hold this directory's ports and pid files
        self._reap_stale()
        self.config: Config = self._write_ini()
        self.layout = Layout.local(
            self.state_dir,
            self.config,
            components=self.components,
            nodelay_so=None,
            ini_path=self.ini_path,
        )
        self.ports: dict[str, int | str] = {
            name: getattr(self.config, key) for name, key in {**PORT_KEYS, **SOCKET_KEYS}.items()
        }
        self.ports["lmtp"] = str(self.layout.postfix_queue_dir / "private/dovecot-lmtp")

    # ------------------------------------------------------------ configuration

    def _write_ini(self) -> Config:
        """Write chatmail.ini for this relay: dev defaults, free ports, then the overrides."""
        domain = self.overrides.get("mail_domain", DEFAULT_DOMAIN)
        s = self.state_dir
        params: dict[str, object] = {
            "mail_domain": domain,
            "mailboxes_dir": s / "vmail/mail" / domain.strip("[]"),
            "passdb_path": s / "vmail/passdb.sqlite",  # absent: no migration
            "nocreate_file": s / "etc/nocreate",
            "doveauth_socket": s / "run/doveauth.socket",
            "doveauth_http_socket": s / "run/doveauth-http.socket",
            "metadata_socket": s / "run/metadata.socket",
            "lastlogin_socket": s / "run/lastlogin.socket",
            "turn_socket_path": s / "run/turn.socket",
            "dkim_key_path": s / "dkim/dkim.private",
            "tls_external_cert_and_key": f"{s}/tls/cert.pem {s}/tls/key.pem",
            **{key: s / path for key, path in LOCAL_SOCKETS.items()},
            "disable_ipv6": True,
            # several relays and test runs share two cores: do not refuse accounts under load
            "max_load_1m": 1000,
            "min_available_memory": "16M",
            "min_free_disk_space": "64M",
        }
        missing = [key for key in PORT_KEYS.values() if key not in self.overrides]
        if self.reuse_ports:
            # a restarted `make run` keeps its ports (and so its dclogin links) when free
            previous = _previous_ports(self.ini_path)
            for key in list(missing):
                port = previous.get(key)
                held = reserve_port(port) if port and port not in params.values() else None
                if held is not None:
                    self._reserved.append(held)
                    params[key] = port
                    missing.remove(key)
        fresh = reserve_ports(len(missing))
        self._reserved += fresh
        params.update(zip(missing, (s.getsockname()[1] for s in fresh), strict=True))
        params.update(self.overrides)
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        write_config(self.ini_path, **params)
        return read_config(self.ini_path)

    @property
    def mail_domain(self) -> str:
        return self.config.mail_domain

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def python(self) -> str:
        """Debian's python3 with this relay's staged chatmaild importable (runs as vmail)."""
        return self.layout.program("python3")

    def facts(self) -> dict[str, object]:
        """What scripts need to talk to this relay (also written to relay.json)."""
        return {
            "mail_domain": self.mail_domain,
            "host": self.host,
            "ports": self.ports,
            "state_dir": str(self.state_dir),
            "mailboxes_dir": self.config.mailboxes_dir,
            "config": str(self.ini_path),
            "log_dir": str(self.log_dir),
            "components": sorted(self.components),
            "nodelay": self.layout.nodelay_so is not None,
            "peers": self.peers,
            # (DNS name, TXT value) other local relays publish to verify our signatures
            "dkim": list(self.dkim_record()) if self.dkim_available() else None,
        }

    # ------------------------------------------------------------ start

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Relay:
        if self._started:
            return self
        self._started = True
        self._stopping.clear()
        try:
            self._reserve_configured_ports()
            self._prepare()
            for name in self._commands():
                self.spawn(name)
            self._wait_ready()
            self._check_ports_unshared()
        except BaseException:
            self.stop()
            raise
        self._write_json()
        if self.supervise:
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"relay-supervisor-{self.mail_domain}", daemon=True
            )
            self._supervisor.start()
        log.info("relay %s ready in %s", self.mail_domain, self.state_dir)
        return self

    def _reap_stale(self) -> None:
        """End processes a killed earlier run of this state directory left running.

        Only processes provably ours are touched: the masters named by this
        directory's pid files, daemons whose command line names this relay's ini.
        """
        doomed: set[int] = set()
        # the masters' pid files where Layout.local puts them
        for pidfile in ("dovecot/run/master.pid", "postfix/spool/pid/master.pid"):
            pid = _read_pid(self.state_dir / pidfile)
            if pid is not None and _alive(pid):
                doomed |= process_tree(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for pidfile in self.run_dir.glob("*.relay-pid") if self.run_dir.exists() else []:
            pid = _read_pid(pidfile)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid else b""
            except OSError:
                cmdline = b""
            if pid and str(self.ini_path).encode() in cmdline:
                doomed |= process_tree(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            pidfile.unlink()
        if doomed:
            log.warning("relay %s: stopping %d leftover processes", self.state_dir, len(doomed))
            _wait_gone(doomed, STOP_TIMEOUT)

    def _prepare(self) -> None:
        vmail = pwd.getpwnam(self.config.vmail_user)
        os.chmod(self.state_dir, 0o755)  # postfix, dovecot, vmail all traverse it
        for d in (self.log_dir, self.layout.postfix_queue_dir, self.layout.dovecot_state_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.log_dir, 0o700)  # the logs name every account; only root writes them
        postfix_user = pwd.getpwnam("postfix")
        self.layout.postfix_data_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.layout.postfix_data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        for d in (self.run_dir, self.state_dir / "vmail", Path(self.config.mailboxes_dir)):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, vmail.pw_uid, vmail.pw_gid)
            # vmail's alone: the dict sockets, account names, hashes (SECURITY.md)
            os.chmod(d, 0o700)
        self._make_tls(vmail.pw_gid)
        if "filtermail" in self.components:
            self._make_dkim_key(vmail)
            # filtermail's sockets inherit group postfix from their setgid directory
            for key in ("filtermail_smtp_socket", "filtermail_smtp_socket_incoming",
                        "filtermail_milter_socket"):  # fmt: skip
                d = Path(getattr(self.config, key)).parent
                d.mkdir(parents=True, exist_ok=True)
                os.chown(d, vmail.pw_uid, postfix_user.pw_gid)
                os.chmod(d, 0o2750)
        if self.nodelay_requested is not False and "dovecot" in self.components:
            from .nodelay import prepare_nodelay

            so = prepare_nodelay(self.state_dir / "nodelay", required=bool(self.nodelay_requested))
            self.layout = self.layout.with_(nodelay_so=so)
        self.layout = self.layout.with_(peers=tuple(self.peers.items()))
        # Dovecot runs quota-expire as vmail, the daemons run as vmail: a copy they can reach
        stage(self.state_dir)
        render_all(self.config, self.layout)

    def _make_tls(self, vmail_gid: int) -> None:
        cert, key = (Path(p) for p in self.config.tls_external_cert_and_key or ("", ""))
        if cert.exists() and key.exists():
            return
        if self.state_dir not in key.parents:
            raise RelayError(f"TLS certificate {cert} or key {key} missing")
        key.parent.mkdir(parents=True, exist_ok=True)
        name = self.mail_domain.strip("[]")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "3650", "-subj", f"/CN={name}",
             "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        # root-started Postfix/Dovecot read the key before dropping privileges;
        # the onboarding endpoint runs as vmail and needs it too
        os.chown(key, 0, vmail_gid)
        os.chmod(key, 0o640)
        os.chmod(cert, 0o644)

    def _make_dkim_key(self, vmail: pwd.struct_passwd) -> None:
        from ..filtermail.dkim import generate_key

        key = Path(self.config.dkim_key_path)
        if key.exists():
            return
        key.parent.mkdir(parents=True, exist_ok=True)
        pem, _ = generate_key(2048)
        tmp = key.with_name(f".{key.name}.tmp")
        tmp.write_bytes(pem)
        os.chown(tmp, 0, vmail.pw_gid)
        os.chmod(tmp, 0o640)
        os.replace(tmp, key)

    def dkim_available(self) -> bool:
        return "filtermail" in self.components and Path(self.config.dkim_key_path).exists()

    def dkim_record(self) -> tuple[str, str]:
        """(DNS name, TXT value) publishing this relay's DKIM public key."""
        from ..filtermail.dkim import public_value, txt_record

        pem = Path(self.config.dkim_key_path).read_bytes()
        name = f"{self.config.dkim_selector}._domainkey.{self.mail_domain.strip('[]')}"
        return name, txt_record(public_value(pem))

    def _commands(self) -> dict[str, list[str]]:
        """Every process of this relay (name -> argv), all staying in the foreground."""
        ini = str(self.ini_path)
        program = self.layout.program
        cmds: dict[str, list[str]] = {}
        c = self.components
        dict_roles = [role for role in DICT_ROLES if role in c]
        if dict_roles:
            cmds["dict"] = [program("chatmail-dict"), "--config", ini, *dict_roles]
        if "filtermail" in c:
            cmds["filtermail"] = [program("filtermail"), "--config", ini, *FILTER_ROLES]
        if "newemail" in c:
            # loopback only, unlike an installed relay's every interface
            listen = f"127.0.0.1:{self.config.newemail_port}"
            cmds["newemail"] = [program("chatmail-newemail"), "--config", ini, "--listen", listen]
        # the servers start once our sockets are asked for (Dovecot connects lazily anyway)
        if "postfix" in c:
            # the master itself, no postfix-script shell between: our child is the master
            conf = str(self.layout.postfix_config_dir)
            master = f"{_postfix_daemon_directory(conf)}/master"
            cmds["postfix"] = [master, "-c", conf, "-s"]
        if "dovecot" in c:
            conf = self.layout.dovecot_config_dir / "dovecot.conf"
            cmds["dovecot"] = ["dovecot", "-F", "-c", str(conf)]
        return cmds

    def daemon_command(self, name: str) -> list[str]:
        """The full command line of daemon ``name``, as the relay starts it (vmail, caps)."""
        cmd = self._commands()[name]
        if name in SERVERS:
            return cmd  # the masters start as root and drop privileges themselves
        user = pwd.getpwnam(self.config.vmail_user)
        # the user's own groups (User= in the units), plus the unit's SupplementaryGroups=
        groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
        if name == "filtermail" and "filtermail" in self.components:
            groups.add(grp.getgrnam("postdrop").gr_gid)  # re-injection is in Postfix's public/
        caps: list[str] = []
        if name == "newemail":
            # like its unit's AmbientCapabilities=CAP_NET_BIND_SERVICE: /new may be on port 443
            caps = ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]
        ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}"]
        setpriv = ["setpriv", *ids, f"--groups={','.join(map(str, sorted(groups)))}", *caps]
        if name == "newemail":
            # like its unit's Nice=10: when the CPU is short, mail comes first
            return ["nice", "-n", "10", *setpriv, *cmd]
        return [*setpriv, *cmd]

    def spawn(self, name: str) -> subprocess.Popen:
        """Start process ``name`` of this relay (again); stop() ends it with the others."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID", "LISTEN_FDS")
        }
        env["HOME"] = str(self.run_dir)
        env["PYTHONUNBUFFERED"] = "1"
        logfile = self.log_dir / (f"{name}-start.out" if name in SERVERS else f"{name}.log")
        if name == "postfix":
            self._postfix_check(logfile)
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                self.daemon_command(name),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.run_dir,
                umask=0o077 if name not in SERVERS else -1,
                start_new_session=True,  # Ctrl-C of `make run` is handled by us, in order
            )
        with self._lock:
            self._procs[name] = proc
            self._started_at[name] = time.monotonic()
        # recorded so that a later start can end what a killed run left behind
        (self.run_dir / f"{name}.relay-pid").write_text(f"{proc.pid}\n")
        return proc

    def _postfix_check(self, logfile: Path) -> None:
        """What `postfix start` does before it runs the master: create missing queue
        directories (private/ for Dovecot's sockets too), check owners and modes."""
        with open(logfile, "ab") as out:
            res = subprocess.run(
                ["postfix", "-c", str(self.layout.postfix_config_dir), "check"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if res.returncode != 0:
            raise RelayError(f"postfix check failed ({res.returncode})\n{self._log_of('postfix')}")

    def _log_of(self, name: str) -> str:
        if name in SERVERS:
            return (
                _tail(self.log_dir / f"{name}-start.out")
                + "\n"
                + _tail(self.log_dir / f"{name}.log")
            )
        return _tail(self.log_dir / f"{name}.log")

    # ------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        """Restart what dies, with back-off (the units' Restart=always), until stop()."""
        delay = {name: RESTART_DELAY for name in self._procs}
        due: dict[str, float] = {}
        while not self._stopping.wait(0.1):
            now = time.monotonic()
            with self._lock:
                procs = dict(self._procs)
            for name, proc in procs.items():
                if name in due:
                    if now >= due[name] and not self._stopping.is_set():
                        del due[name]
                        self._restart(name)
                    continue
                status = proc.poll()  # also reaps it: no zombie stays behind
                if status is None:
                    continue
                if now - self._started_at[name] >= RESTART_RESET_AFTER:
                    delay[name] = RESTART_DELAY
                log.warning(
                    "relay %s: %s exited with status %s; restarting in %.1f s",
                    self.mail_domain, name, status, delay[name],
                )  # fmt: skip
                due[name] = now + delay[name]
                delay[name] = min(delay[name] * 2, RESTART_DELAY_MAX)

    def _restart(self, name: str) -> None:
        if name in SERVERS:
            # what the dead master left (children finishing, a stale lock) must go first
            self._end_server_leftovers(name)
        try:
            proc = self.spawn(name)
        except OSError as e:
            log.error("relay %s: cannot restart %s: %s", self.mail_domain, name, e)
            return
        self.restarts[name] = self.restarts.get(name, 0) + 1
        log.warning("relay %s: restarted %s (pid %d)", self.mail_domain, name, proc.pid)

    def _end_server_leftovers(self, name: str) -> None:
        pid = self._postfix_pid() if name == "postfix" else self._dovecot_pid()
        if pid is not None:
            doomed = process_tree(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait_gone(doomed, STOP_TIMEOUT)

    def _readiness_checks(self) -> list[tuple[str, str | tuple[str, int], Path]]:
        """(what, unix path or (host, port), log to show on failure)."""
        c, cfg, logs = self.components, self.config, self.log_dir
        checks: list[tuple[str, str | tuple[str, int], Path]] = []
        for name, key in (
            ("doveauth", "doveauth_socket"),
            ("doveauth", "doveauth_http_socket"),  # Dovecot 2.4's Lua passdb/userdb
            ("lastlogin", "lastlogin_socket"),
            ("metadata", "metadata_socket"),
        ):
            if name in c:
                checks.append((name, getattr(cfg, key), logs / "dict.log"))
        if "filtermail" in c:
            checks.append(("filtermail", cfg.filtermail_smtp_socket, logs / "filtermail.log"))
            checks.append(("filtermail incoming", cfg.filtermail_smtp_socket_incoming,
                           logs / "filtermail.log"))  # fmt: skip
            checks.append(("filtermail milter", cfg.filtermail_milter_socket,
                           logs / "filtermail.log"))  # fmt: skip
        if "newemail" in c:
            checks.append(("newemail", ("127.0.0.1", cfg.newemail_port), logs / "newemail.log"))
        if "postfix" in c:
            # the unix services (re-injection) are bound before `postfix start` returns
            for name in ("smtp", "submission", "submissions"):
                checks.append((f"postfix {name}", ("127.0.0.1", int(self.ports[name])),
                               logs / "postfix.log"))  # fmt: skip
        if "dovecot" in c:
            for name in ("imap", "imaps"):
                checks.append((f"dovecot {name}", ("127.0.0.1", int(self.ports[name])),
                               logs / "dovecot.log"))  # fmt: skip
            if "postfix" in c:
                checks.append(("dovecot lmtp", str(self.ports["lmtp"]), logs / "dovecot.log"))
        return checks

    def _wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every listener is up."""
        pending = self._readiness_checks()
        deadline = time.monotonic() + timeout
        while pending:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RelayError(
                        f"{name} exited with {proc.returncode} during start\n" + self._log_of(name)
                    )
            tcp, unix = _listening()
            pending = [
                chk
                for chk in pending
                if not (chk[1] in unix if isinstance(chk[1], str) else chk[1] in tcp)
            ]
            if not pending:
                break
            if time.monotonic() > deadline:
                what, _, logfile = pending[0]
                raise RelayError(
                    f"not ready after {timeout:.0f}s: {', '.join(p[0] for p in pending)}\n"
                    + _tail(logfile)
                )
            time.sleep(0.02)

    def _write_json(self) -> None:
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.facts(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.json_path)

    # ------------------------------------------------------------ peers

    def add_peer(self, other: Relay | str, port: int | None = None) -> None:
        """Route mail for another relay's domain to its port 25 on loopback.

        Every other destination stays refused; ``other`` may be a Relay or a
        domain with its SMTP ``port``.
        """
        if isinstance(other, Relay):
            domain, port = other.mail_domain, other.config.smtp_port
        else:
            domain = other
        if port is None:
            raise ValueError("add_peer(domain, port): port is required for a domain")
        self.peers[domain] = f"smtp:[127.0.0.1]:{port}"
        transport = self.layout.postfix_config_dir / "transport"
        if transport.parent.exists():
            tmp = transport.with_suffix(".tmp")
            tmp.write_text(transport_map(self.peers.items()), encoding="utf-8")
            os.replace(tmp, transport)
        if self._postfix_pid() is not None:
            subprocess.run(
                ["postfix", "-c", str(self.layout.postfix_config_dir), "reload"],
                check=True,
                capture_output=True,
            )
        if self.json_path.exists():
            self._write_json()

    # ------------------------------------------------------------ stop

    def _postfix_pid(self) -> int | None:
        pid = _read_pid(self.layout.postfix_queue_dir / "pid/master.pid")
        return pid if pid and _alive(pid) else None

    def _dovecot_pid(self) -> int | None:
        pid = _read_pid(self.layout.dovecot_base_dir / "master.pid")
        return pid if pid and _alive(pid) else None

    def _masters(self) -> set[int]:
        """The Postfix and Dovecot master processes, also while they are still starting."""
        masters = {pid for pid in (self._dovecot_pid(), self._postfix_pid()) if pid is not None}
        with self._lock:
            procs = dict(self._procs)
        if "dovecot" in procs and procs["dovecot"].poll() is None:
            masters.add(procs["dovecot"].pid)
        if "postfix" in procs and procs["postfix"].poll() is None:
            masters.add(procs["postfix"].pid)
        return masters

    def _stragglers(self) -> set[int]:
        """Live processes whose command line names this relay's state directory."""
        markers = {str(self.state_dir).encode(), str(self.state_dir.resolve()).encode()}
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if any(m + b"/" in cmdline for m in markers) and _alive(int(entry)):
                found.add(int(entry))
        return found

    def stop(self) -> None:
        """Stop everything this relay started; wait until no process of it is left.

        Safe at any point of a start: every process is our child or its descendant.
        """
        if not self._started:
            self._release_ports()
            return
        self._started = False
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        doomed: set[int] = set()
        # masters stop their children on SIGTERM
        masters = self._masters()
        for pid in masters:
            doomed |= process_tree(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for proc in self._procs.values():
            if proc.poll() is None:
                doomed |= process_tree(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        resend = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for proc in self._procs.values():
                proc.poll()  # reap our direct children
            # a master whose pid file appeared only now (one still starting when the stop
            # began; seen once under load): it and its children go too
            for pid in self._masters() - masters:
                log.info("relay %s: stopping master %d found late", self.state_dir, pid)
                masters.add(pid)
                doomed |= process_tree(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            doomed = {p for p in doomed if _alive(p)}
            if not doomed:
                break
            if time.monotonic() >= resend:
                # a master still starting can lose the signal (Dovecot 2.4 re-executes
                # itself after reading its config): say it again
                resend = time.monotonic() + 1.0
                for pid in masters & doomed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            time.sleep(0.02)
        for pid in doomed:
            log.warning("relay %s: pid %d did not stop in time; killing it", self.state_dir, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(doomed, 5.0)  # SIGKILL takes effect asynchronously
        # A master that forks a service just as SIGTERM arrives leaves a child that is
        # not in any tree we saw: not yet exec'd, it still runs master's code with SIGTERM
        # ignored and blocked, reparented to init, and waits forever.  Its command line
        # names our config directory, which nothing else does.
        stragglers = self._stragglers()
        for pid in stragglers:
            log.warning("relay %s: killing pid %d left by a stopped master", self.state_dir, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(stragglers, 5.0)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        for pidfile in self.run_dir.glob("*.relay-pid"):
            pidfile.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.json_path.unlink()
        self._release_ports()

    def _release_ports(self) -> None:
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()

    def _reserve_configured_ports(self) -> None:
        """Hold the ports again for a start after a stop (best effort: the shared-port
        check after the start still catches another listener)."""
        if self._reserved:
            return
        for name in PORT_KEYS:
            held = reserve_port(int(self.ports[name]))
            if held is not None:
                self._reserved.append(held)

    def _check_ports_unshared(self) -> None:
        """Refuse to run when another process listens on one of our ports too."""
        ports = {int(self.ports[name]): name for name in PORT_KEYS}
        shared = {
            port: count for port, count in _listeners_per_port().items()
            if port in ports and count > 1
        }  # fmt: skip
        if shared:
            raise RelayError(
                "other processes listen on this relay's ports too (SO_REUSEPORT): "
                + ", ".join(f"{ports[p]} {p} ({n} listeners)" for p, n in sorted(shared.items()))
            )

    # ------------------------------------------------------------ client helpers

    def new_credentials(self) -> tuple[str, str]:
        """A fresh random address (valid localpart length) and password for this relay."""
        alphabet = string.ascii_lowercase + string.digits
        local = "".join(secrets.choice(alphabet) for _ in range(self.config.username_max_length))
        password = secrets.token_urlsafe(18)
        return f"{local}@{self.mail_domain}", password

    def imap(self, addr: str, password: str):
        """A logged-in IMAP4_SSL connection (creates the account on first login)."""
        import imaplib

        conn = imaplib.IMAP4_SSL(
            self.host, int(self.ports["imaps"]), ssl_context=client_tls_context(), timeout=30
        )
        conn.login(addr, password)
        return conn

    def smtp(self, addr: str | None = None, password: str | None = None):
        """SMTP_SSL to implicit-TLS submission, logged in when credentials are given."""
        import smtplib

        conn = smtplib.SMTP_SSL(
            self.host, int(self.ports["submissions"]), context=client_tls_context(), timeout=30
        )
        # like mail clients do: commands and the end of data go out at once (no Nagle)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if addr is not None and password is not None:
            conn.login(addr, password)
        return conn

    def running_pids(self) -> set[int]:
        """Every process of this relay right now (masters with children, daemons)."""
        pids: set[int] = set()
        for pid in self._masters():
            pids |= process_tree(pid)
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                pids |= process_tree(proc.pid)
        return pids

    def process_of(self, component: str) -> str:
        """The name of the process serving ``component`` (a process name: itself)."""
        if component in DICT_ROLES:
            return "dict"
        return component

    def pid_of(self, name: str) -> int | None:
        """The pid of process ``name`` (or of the process serving component ``name``) now;
        it changes when the supervisor restarts it."""
        with self._lock:
            proc = self._procs.get(self.process_of(name))
        return proc.pid if proc is not None and proc.poll() is None else None

    def proc_of(self, name: str) -> subprocess.Popen:
        """The process object of process ``name`` or of the one serving component ``name``."""
        with self._lock:
            return self._procs[self.process_of(name)]


def _previous_ports(ini: Path) -> dict[str, int]:
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(ini, encoding="utf-8")
        items = dict(parser.items("params"))
    except (configparser.Error, OSError):
        return {}
    return {k: int(v) for k, v in items.items() if k in PORT_KEYS.values() and v.isdigit()}


def _tcp_listeners() -> Iterator[tuple[str, int, str]]:
    """(IPv4 address, port, socket inode) of every listening TCP socket, from /proc/net/tcp."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = fields[1].split(":")
            yield socket.inet_ntoa(bytes.fromhex(addr)[::-1]), int(port, 16), fields[9]


def _listeners_per_port(host: str = "127.0.0.1") -> dict[int, int]:
    """How many listening IPv4 TCP sockets (distinct inodes) each port of ``host`` has."""
    inodes: dict[int, set[str]] = {}
    for ip, port, inode in _tcp_listeners():
        if ip in (host, "0.0.0.0"):
            inodes.setdefault(port, set()).add(inode)
    return {port: len(found) for port, found in inodes.items()}


def _listening() -> tuple[set[tuple[str, int]], set[str]]:
    """Listening IPv4 TCP (host, port) and UNIX socket paths, from /proc/net.

    Looking instead of connecting keeps readiness checks out of the servers'
    logs (a probe that never speaks TLS is logged as a failed handshake).
    """
    tcp: set[tuple[str, int]] = set()
    for ip, port, _ in _tcp_listeners():
        tcp.add((ip, port))
        if ip == "0.0.0.0":
            tcp.add(("127.0.0.1", port))
    unix: set[str] = set()
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
                unix.add(fields[7])
    return tcp, unix


def connectable(target: str | tuple[str, int]) -> bool:
    """Whether a UNIX socket path or (host, port) accepts a connection now."""
    if isinstance(target, str):
        if not os.path.exists(target):
            return False
        family, addr = socket.AF_UNIX, target
    else:
        family, addr = socket.AF_INET, target
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(addr)
        except OSError:
            return False
    return True


_connectable = connectable  # older name, used by other areas' tests


def remove_state(state_dir: Path) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)
