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
import ipaddress
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
from collections.abc import Iterable, Mapping
from pathlib import Path

from chatmaild.common.config import Config, read_config, write_config
from chatmaild.expire.maildir import remove_stale_uidlist_locks
from chatmaild.relay.ports import (
    LOCAL_SOCKETS,
    PORT_KEYS,
    SOCKET_KEYS,
    PortHolding,
    _previous_ports,
    connectable,
    reserve_port,
    reserve_ports,
)
from chatmaild.relay.processes import (
    DICT_ROLES,
    SERVERS,
    STOP_TIMEOUT,
    WEB_NICE,
    RelayError,
    Supervision,
    _alive,
    _read_pid,
    _wait_gone,
    open_log,
    process_tree,
    title,
)
from chatmaild.relay.readiness import Readiness
from chatmaild.relay.render import (
    ALL_COMPONENTS,
    DAEMON_MODULES,
    MXDELIV_ROUTES,
    Layout,
    Peer,
    dovecot_stats_socket,
    raise_kernel_limits,
    render_all,
    write_routes,
)
from chatmaild.relay.staging import stage

log = logging.getLogger("chatmaild.relay")

DEFAULT_DOMAIN = "chat.example"
# a process serves several roles (one interpreter and one set of libraries in
# memory instead of one per role), as the units in systemd/ do: "dict" the
# dict daemons, "filtermail" the filters; the web front door ("newemail") is a
# process of its own, so that its public port cannot take time from the filters
FILTER_ROLES = ("outgoing", "incoming", "milter", "transport")


# a name no account can have: its userdb lookup answers "no such user", logs nothing
AUTH_WARMUP_USER = "chatmail-auth-warmup"
EX_NOUSER = 67  # doveadm user: the lookup worked, the user does not exist


def warm_dovecot_auth(conf: Path) -> None:
    """One userdb lookup through a running Dovecot, so that its auth process
    has talked to an auth-worker before the first logins come.

    Dovecot 2.4's auth learns how many workers it may use (service auth-worker's
    process_limit, 30) from the first worker's handshake.  Before that, a burst of
    logins opens one connection per login; those past the limit wait for a
    worker that never comes and fail as "Temporary authentication failure" (31
    of 1,000 new devices at once, bench devices).  The unit does the same
    (systemd/dovecot.service.d).  Harmless on 2.3, which has the limit in its
    settings.
    """
    res = subprocess.run(["doveadm", "-c", str(conf), "user", AUTH_WARMUP_USER],
                         capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    if res.returncode != EX_NOUSER:  # the answer expected: no such user
        log.warning("Dovecot's first auth lookup: exit %d: %s", res.returncode,
                    (res.stderr or res.stdout).strip()[:300])  # fmt: skip


def available_components() -> tuple[str, ...]:
    """Every component whose code exists in this checkout."""
    have = ["postfix", "dovecot"]
    if shutil.which("turnserver"):  # Debian's coturn
        have.append("turn")
    for name, module in DAEMON_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            have.append(name)
    if importlib.util.find_spec("prometheus_client") is not None:
        have.append("metrics")
    return tuple(have)


@functools.cache
def _postfix_daemon_directory(config_dir: str) -> str:
    return subprocess.run(
        ["postconf", "-c", config_dir, "-h", "daemon_directory"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def client_tls_context() -> ssl.SSLContext:
    """TLS context for talking to a local relay's self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def listen_host(mail_domain: str) -> str:
    """The loopback address a local relay listens on: an IP-only relay's own
    (``127.0.0.2``: two of them are two hosts), else 127.0.0.1."""
    try:
        addr = ipaddress.IPv4Address(mail_domain.strip("[]"))
    except ValueError:
        return "127.0.0.1"
    return str(addr) if addr.is_loopback else "127.0.0.1"


class Relay(PortHolding, Supervision, Readiness):
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
        self.peers: dict[str, Peer] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._started_at: dict[str, float] = {}
        self._lock = threading.Lock()  # _procs: the supervisor restarts, stop() ends
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts: dict[str, int] = {}
        self._started = False
        # our TCP ports, bound until stop() so no other relay picks them meanwhile
        self._reserved: list[socket.socket] = []
        self.host = listen_host(self.overrides.get("mail_domain", DEFAULT_DOMAIN))
        # a killed earlier run may still hold this directory's ports and pid files
        self._reap_stale()
        self.config: Config = self._write_ini()
        self.layout = Layout.local(
            self.state_dir,
            self.config,
            components=self.components,
            nodelay_so=None,
            ini_path=self.ini_path,
            listen_host=self.host,
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
            "turn_secret_path": s / "etc/turn.secret",
            "dkim_key_path": s / "dkim/dkim.private",
            "tls_external_cert_and_key": f"{s}/tls/cert.pem {s}/tls/key.pem",
            # self-signed (a certificate from a CA only when a test names its CA)
            "acme_directory": "",
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
                fits = port and port not in params.values()
                held = reserve_port(port, self.host) if fits else None
                if held is not None:
                    self._reserved.append(held)
                    params[key] = port
                    missing.remove(key)
        fresh = reserve_ports(len(missing), self.host)
        self._reserved += fresh
        params.update(zip(missing, (s.getsockname()[1] for s in fresh), strict=True))
        params["metrics_dir"] = s / "metrics"
        if "metrics" in self.components:  # chatmail-metrics, and the daemons count
            [held] = reserve_ports(1, self.host)
            self._reserved.append(held)
            params["metrics_address"] = f"{self.host}:{held.getsockname()[1]}"
        params.update(self.overrides)
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        write_config(self.ini_path, **params)
        return read_config(self.ini_path)

    @property
    def mail_domain(self) -> str:
        return self.config.mail_domain

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
            "peers": {domain: f"{p.host}:{p.smtp_port}" for domain, p in self.peers.items()},
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
            # a killed earlier run's uidlist locks: no Dovecot of this relay runs now
            remove_stale_uidlist_locks(self.config.mailboxes_dir, min_age=0)
            for name in self._commands():
                self.spawn(name)
            self._wait_ready()
            self._check_ports_unshared()
            if "dovecot" in self.components:
                warm_dovecot_auth(self.layout.dovecot_config_dir / "dovecot.conf")
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
        postfix_user = pwd.getpwnam("postfix")
        # the logs name every account: root's, and Postfix's mail_owner may enter to
        # write its own.  postsuper (`postfix check` before each start) runs as
        # mail_owner and, with the master down, writes its warnings (a killed cleanup's
        # temporary file) to the file itself; failing that, it stopped the start
        os.chown(self.log_dir, 0, postfix_user.pw_gid)
        os.chmod(self.log_dir, 0o710)
        maillog = self.log_dir / "postfix.log"
        open_log(maillog).close()
        os.chown(maillog, postfix_user.pw_uid, postfix_user.pw_gid)
        self.layout.postfix_data_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.layout.postfix_data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        dirs = (self.run_dir, self.state_dir / "vmail", Path(self.config.mailboxes_dir),
                Path(self.config.metrics_dir))  # fmt: skip
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, vmail.pw_uid, vmail.pw_gid)
            # vmail's alone: the dict sockets, account names, hashes (SECURITY.md)
            os.chmod(d, 0o700)
        self._make_tls(vmail.pw_gid)
        if "filtermail" in self.components:
            self._make_dkim_key(vmail)
            # filtermail's sockets inherit group postfix from their setgid directory
            for key in ("filtermail_smtp_socket", "filtermail_smtp_socket_incoming",
                        "filtermail_milter_socket", "filtermail_transport_socket"):  # fmt: skip
                d = Path(getattr(self.config, key)).parent
                d.mkdir(parents=True, exist_ok=True)
                os.chown(d, vmail.pw_uid, postfix_user.pw_gid)
                os.chmod(d, 0o2750)
        if self.nodelay_requested is not False and "dovecot" in self.components:
            from chatmaild.relay.nodelay import prepare_nodelay

            so = prepare_nodelay(self.state_dir / "nodelay", required=bool(self.nodelay_requested))
            self.layout = self.layout.with_(nodelay_so=so)
        self.layout = self.layout.with_(peers=tuple(self.peers.values()))
        if "dovecot" in self.components:
            raise_kernel_limits(log)  # inotify per IDLE client (sysctl/60-chatmaild.conf)
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
             "-addext", f"subjectAltName=DNS:{name},IP:{self.host}",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        # root-started Postfix/Dovecot read the key before dropping privileges;
        # the onboarding endpoint runs as vmail and needs it too
        os.chown(key, 0, vmail_gid)
        os.chmod(key, 0o640)
        os.chmod(cert, 0o644)

    def _make_dkim_key(self, vmail: pwd.struct_passwd) -> None:
        from chatmaild.filtermail.dkim import generate_key

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
        from chatmaild.filtermail.dkim import public_value, txt_record

        pem = Path(self.config.dkim_key_path).read_bytes()
        name = f"{self.config.dkim_selector}._domainkey.{self.mail_domain.strip('[]')}"
        return name, txt_record(public_value(pem))

    @property
    def acme_dir(self) -> Path:
        """chatmail-acme's state of this relay (its /var/lib/chatmaild/acme)."""
        return self.state_dir / "acme"

    def acme_command(self, *args: str, ca_bundle: str | None = None) -> list[str]:
        """chatmail-acme for this relay: its files, and reloads of its own servers
        (SIGHUP to each master and the web process, what the units' reloads do)."""
        cmd = [
            self.layout.program("chatmail-acme"), "--config", str(self.ini_path),
            "--state-dir", str(self.acme_dir), "--challenges", str(self.acme_dir / "challenges"),
            "--tls-dir", str(self.layout.tls_cert.parent),
        ]  # fmt: skip
        for name in ("postfix", "dovecot", "newemail"):
            if name in self.components:
                pidfile = self.run_dir / f"{name}.relay-pid"
                cmd += ["--reload", f'sh -c "kill -HUP $(cat {pidfile})"']
        if "postfix" in self.components:
            cmd += ["--flush", f"postqueue -c {self.layout.postfix_config_dir} -f"]
        if ca_bundle:
            cmd += ["--ca-bundle", ca_bundle]
        return [*cmd, *args]

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
            # a local relay delivers to its peers only (filtermail transport's routes)
            routes = str(self.layout.postfix_config_dir / MXDELIV_ROUTES)
            # with metrics on it serves /metrics too, and asks this relay's showq
            queue = str(self.layout.postfix_queue_dir)
            stats = str(dovecot_stats_socket(self.layout))  # Dovecot's own metrics
            cmds["filtermail"] = [program("filtermail"), "--config", ini, "--routes", routes,
                                  "--postfix-queue", queue, "--dovecot-stats", stats,
                                  *FILTER_ROLES]  # fmt: skip
        if "newemail" in c:
            # loopback only, unlike an installed relay's every interface
            cmds["newemail"] = [
                program("chatmail-newemail"), "--config", ini,
                "--listen", f"chatmail-newemail={self.host}:{self.config.newemail_port}",
                "--listen", f"chatmail-http={self.host}:{self.config.http_port}",
                "--acme-challenges", str(self.acme_dir / "challenges"),
                "--tunnel-host", self.host, "--iroh-host", self.host,
                # the iroh relay, a role of the web process (as the unit's --iroh)
                "--listen", f"chatmail-iroh={self.host}:{self.config.iroh_relay_port}",
                # port 993's IMAP front (the unit's default role)
                "--listen", f"chatmail-imaps={self.host}:{self.config.imaps_port}",
            ]  # fmt: skip
        # the servers start once our sockets are asked for (Dovecot connects lazily anyway)
        if "postfix" in c:
            # the master itself, no postfix-script shell between: our child is the master
            conf = str(self.layout.postfix_config_dir)
            master = f"{_postfix_daemon_directory(conf)}/master"
            cmds["postfix"] = [master, "-c", conf, "-s"]
        if "dovecot" in c:
            conf = self.layout.dovecot_config_dir / "dovecot.conf"
            cmds["dovecot"] = ["dovecot", "-F", "-c", str(conf)]
        if "turn" in c:
            # in the foreground, no pid file: as Debian's coturn.service runs it
            cmds["turn"] = ["turnserver", "-c", str(self.layout.turn_config), "--pidfile="]
        return cmds

    def daemon_command(self, name: str) -> list[str]:
        """The full command line of daemon ``name``, as the relay starts it (vmail, caps)."""
        cmd = self._commands()[name]
        if name in SERVERS:
            return cmd  # the masters start as root and drop privileges themselves
        # coturn runs as Debian's turnserver user (coturn.service's User=)
        user = pwd.getpwnam("turnserver" if name == "turn" else self.config.vmail_user)
        # the user's own groups (User= in the units), plus the unit's SupplementaryGroups=
        groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
        if name == "filtermail":
            # re-injection, and the showq service metrics ask, are in Postfix's public/
            groups.add(grp.getgrnam("postdrop").gr_gid)
        caps: list[str] = []
        if name == "newemail":
            # like its unit's AmbientCapabilities=CAP_NET_BIND_SERVICE: /new may be on port 443
            caps = ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]
        ids = [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}"]
        setpriv = ["setpriv", *ids, f"--groups={','.join(map(str, sorted(groups)))}", *caps]
        if name == "newemail":
            # like its unit's Nice=10 (its session's share: processes.spawn)
            return ["nice", "-n", str(WEB_NICE), *setpriv, *cmd]
        return [*setpriv, *cmd]

    def _postfix_check(self, logfile: Path) -> None:
        """What `postfix start` does before it runs the master: create missing queue
        directories (private/ for Dovecot's sockets too), check owners and modes."""
        with open_log(logfile) as out:
            res = subprocess.run(
                ["postfix", "-c", str(self.layout.postfix_config_dir), "check"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        if res.returncode != 0:
            raise RelayError(f"postfix check failed ({res.returncode})\n{self._log_of('postfix')}")

    # ------------------------------------------------------------ supervision

    def _write_json(self) -> None:
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.facts(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.json_path)

    # ------------------------------------------------------------ peers

    def add_peer(
        self,
        other: Relay | str,
        port: int | None = None,
        host: str = "127.0.0.1",
        https_port: int | None = None,
    ) -> None:
        """Deliver mail for another relay's domain to it on loopback: over HTTPS
        (its web port's /mxdeliv) first, then its port 25 (filtermail transport).

        Every other destination stays refused; ``other`` may be a Relay or a
        domain with its SMTP ``port`` and ``https_port`` on loopback address ``host``.
        """
        if isinstance(other, Relay):
            domain, port, host = other.mail_domain, other.config.smtp_port, other.host
            https_port = other.config.newemail_port
        else:
            domain = other
        if port is None:
            raise ValueError("add_peer(domain, port): port is required for a domain")
        self.peers[domain] = Peer(domain, host, port, https_port or 443)
        self.layout = self.layout.with_(peers=tuple(self.peers.values()))
        if self.layout.postfix_config_dir.exists():
            write_routes(self.config, self.layout)
        if self._postfix_pid() is not None:
            subprocess.run(
                ["postfix", "-c", str(self.layout.postfix_config_dir), "reload"],
                check=True,
                capture_output=True,
            )
        if self.json_path.exists():
            self._write_json()

    # ------------------------------------------------------------ stop

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
            log.warning("relay %s: pid %d (%s) did not stop in time; killing it",
                        self.state_dir, pid, title(pid))  # fmt: skip
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


_connectable = connectable  # older name, used by other areas' tests


def remove_state(state_dir: Path) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)
