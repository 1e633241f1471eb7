"""Render the Postfix, Dovecot and systemd templates from chatmail.ini.

The same templates (top-level ``postfix/``, ``dovecot/``, ``systemd/``) serve
production (``make install``), ``make run`` and the tests.  A template is plain
config text with ``{{ name }}`` placeholders; Dovecot and Postfix use ``$`` and
``%`` themselves, so nothing else is special.  An unknown name is an error, so a
typo cannot silently render an empty setting.

What differs between a production host and a loopback relay in a state
directory (paths, listen addresses, the default transport, ...) is a
:class:`Layout`; everything else comes from :class:`~chatmaild.common.config.Config`.

Dovecot 2.3 and 2.4 take different configuration syntax (and 2.4 has no dict
passdb): the installed series (``dovecot --version``) picks
``dovecot/dovecot.conf`` + ``auth.conf`` (2.3, doveauth over the dict protocol)
or ``dovecot/dovecot-2.4.conf`` + ``auth.lua`` (2.4, doveauth over HTTP).
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from chatmaild.common.config import DEFAULT_CONFIG_PATH, Config, ConfigError
from chatmaild.common.turn import ensure_secret
from chatmaild.exporter import DOVECOT_STATS_NAME
from chatmaild.relay.dovecotversion import dovecot_version, installed_series

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

# where the Debian package (which `make install` builds and installs) puts things
PACKAGE_SHARE = Path("/usr/share/chatmaild")  # templates: postfix/, dovecot/
PACKAGE_STATE = Path("/var/lib/chatmaild")  # the no-delay shim, Postfix's files before us
GENERATED_DIR = Path("/etc/chatmail")  # rendered postfix/ and dovecot/ (chatmaild setup)
PACKAGE_BIN = Path("/usr/bin")
CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def _source_root() -> Path:
    """Where the templates are: a checkout keeps them next to the package, the Debian
    package in /usr/share/chatmaild; CHATMAILD_SOURCE_ROOT overrides both."""
    if os.environ.get("CHATMAILD_SOURCE_ROOT"):
        return Path(os.environ["CHATMAILD_SOURCE_ROOT"])
    if (CHECKOUT_ROOT / "postfix" / "main.cf").exists():
        return CHECKOUT_ROOT
    return PACKAGE_SHARE


SOURCE_ROOT = _source_root()

POSTFIX_FILES = (
    "main.cf",
    "master.cf",
    "submission_header_cleanup",
    "lmtp_header_cleanup",
    "login_map",
    "tls_policy",
)
# per Dovecot series: (template in dovecot/, rendered name), then files copied as they are
DOVECOT_TEMPLATES = {
    "2.3": (("dovecot.conf", "dovecot.conf"), ("auth.conf", "auth.conf")),
    "2.4": (("dovecot-2.4.conf", "dovecot.conf"),),
}
PUSH_LUA = "push_notification.lua"
IMAP_CLIENT_LIMIT = 10  # clients per Dovecot imap process (dovecot.conf says why)
AUTH_LUA = "auth.lua"
DOVECOT_COPIES = {"2.3": (PUSH_LUA,), "2.4": (PUSH_LUA, AUTH_LUA)}

# components a relay can run; "postfix"/"dovecot" are the servers, the rest
# are chatmaild daemons (module name used to check they exist)
DAEMON_MODULES = {
    "doveauth": "chatmaild.dictd.doveauth",
    "lastlogin": "chatmaild.dictd.lastlogin",
    "metadata": "chatmaild.dictd.metadata",
    "filtermail": "chatmaild.filtermail",
    "newemail": "chatmaild.web.main",
}
# coturn (Debian's turnserver): TURN for calls
# metrics: metrics_address set, the daemons count and filtermail serves /metrics
ALL_COMPONENTS = ("postfix", "dovecot", "turn", *DAEMON_MODULES, "metrics")


def production_nodelay() -> Path | None:
    """The installed no-delay shim, if it is there and fits the installed Dovecot."""
    from chatmaild.relay.nodelay import SO_NAME, applies

    so = PACKAGE_STATE / SO_NAME
    return so if so.exists() and applies(dovecot_version()) else None


class TemplateError(Exception):
    """A template names a variable nobody provides."""


def render_text(text: str, variables: Mapping[str, object], source: str = "template") -> str:
    """Substitute ``{{ name }}``; raise TemplateError naming every unknown variable."""
    missing = sorted({m.group(1) for m in PLACEHOLDER.finditer(text)} - set(variables))
    if missing:
        raise TemplateError(f"{source}: unknown template variable(s): {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: str(variables[m.group(1)]), text)


def render_file(src: Path, dest: Path, variables: Mapping[str, object], mode: int = 0o644) -> None:
    """Render ``src`` into ``dest`` atomically (a half-written main.cf must never be read)."""
    text = render_text(src.read_text(encoding="utf-8"), variables, str(src))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, dest)


def host_name(config: Config) -> str:
    """Postfix's myhostname (banner, HELO): the domain, or for an IP-only relay its
    address's reverse-pointer name (Postfix wants a name there, not an address)."""
    bare = config.mail_domain.strip("[]")
    if config.is_ip_domain:
        return ipaddress.ip_address(bare).reverse_pointer
    return bare


class Peer(NamedTuple):
    """Another local relay: where its port 25 and its web port (/mxdeliv) are."""

    domain: str
    host: str
    smtp_port: int
    https_port: int


MXDELIV_ROUTES = "mxdeliv_routes"
# Postfix's lmtp clients to filtermail transport: deliveries to other relays at once
MXDELIV_MAXPROC = 64  # make run's peers for filtermail transport (--routes)


@dataclass(frozen=True)
class Layout:
    """Where a relay's files live and what it listens on."""

    root: Path  # "/" for production, the state directory otherwise
    postfix_config_dir: Path
    postfix_queue_dir: Path
    postfix_data_dir: Path
    dovecot_config_dir: Path
    dovecot_base_dir: Path
    dovecot_state_dir: Path
    dovecot_instance: str
    tls_cert: Path
    tls_key: Path
    log_dir: Path | None  # None: syslog/journald
    listen_host: str | None  # None: every interface
    default_transport: str
    smtp_tls_security_level: str
    imap_login_min_avail: int = 10
    nodelay_so: Path | None = None
    components: frozenset[str] = frozenset(ALL_COMPONENTS)
    # local relays this one delivers to: (domain, address, smtp port, https port)
    peers: tuple[Peer, ...] = field(default=())
    # "2.3" or "2.4"; None: the installed Dovecot's
    dovecot_series: str | None = None
    ini_path: Path | None = None  # chatmail.ini quota-expire reads; None: the default
    # where our programs are (Dovecot runs quota-expire from here)
    bin_dir: Path = PACKAGE_BIN
    turn_config: Path = GENERATED_DIR / "turnserver.conf"  # coturn's (render_turn)

    def program(self, name: str) -> str:
        """Absolute path of one of our console scripts in this layout."""
        return str(self.bin_dir / name)

    @classmethod
    def production(cls, config: Config, root: Path = Path("/")) -> Layout:
        cert, key = config.tls_cert_and_key
        # Postfix's own main.cf and master.cf get our settings through postconf, and
        # Dovecot runs our complete configuration (chatmaild setup): what is rendered
        # lives below /etc/chatmail, no file of Postfix's or Dovecot's is replaced
        return cls(
            root=root,
            postfix_config_dir=GENERATED_DIR / "postfix",
            postfix_queue_dir=Path("/var/spool/postfix"),
            postfix_data_dir=Path("/var/lib/postfix"),
            dovecot_config_dir=GENERATED_DIR / "dovecot",
            dovecot_base_dir=Path("/run/dovecot"),
            dovecot_state_dir=Path("/var/lib/dovecot"),
            dovecot_instance="dovecot",
            tls_cert=Path(cert),
            tls_key=Path(key),
            log_dir=None,
            listen_host=None,
            default_transport="smtp",
            smtp_tls_security_level="verify",
            nodelay_so=production_nodelay(),
        )

    @classmethod
    def local(cls, state_dir: Path, config: Config, **kw: object) -> Layout:
        """A relay living entirely in ``state_dir``, on 127.0.0.1, delivering nowhere else."""
        state_dir = state_dir.resolve()
        cert, key = config.tls_external_cert_and_key or (
            str(state_dir / "tls/cert.pem"),
            str(state_dir / "tls/key.pem"),
        )
        values: dict[str, object] = dict(
            root=state_dir,
            postfix_config_dir=state_dir / "etc/postfix",
            postfix_queue_dir=state_dir / "postfix/spool",
            postfix_data_dir=state_dir / "postfix/data",
            dovecot_config_dir=state_dir / "etc/dovecot",
            dovecot_base_dir=state_dir / "dovecot/run",
            dovecot_state_dir=state_dir / "dovecot/state",
            dovecot_instance=f"chatmail-{config.imaps_port}",
            tls_cert=Path(cert),
            tls_key=Path(key),
            log_dir=state_dir / "log",
            listen_host="127.0.0.1",
            default_transport="error:5.7.1 delivery outside this local relay is disabled",
            smtp_tls_security_level="encrypt",
            imap_login_min_avail=1,
            bin_dir=state_dir / "bin",
            turn_config=state_dir / "etc/turnserver.conf",
        )
        values.update(kw)
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> Layout:
        return replace(self, **changes)  # type: ignore[arg-type]


def postfix_path(path: str, queue_dir: Path) -> str:
    """A socket path as Postfix clients should name it: relative to the queue
    directory (their working directory, also inside a chroot) when it is there."""
    try:
        return str(Path(path).relative_to(queue_dir))
    except ValueError:
        return path


SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def postfix_service(config: Config, key: str, queue_dir: Path) -> str:
    """The master.cf name of the Postfix service whose socket ``key`` names.

    Postfix puts a ``unix`` service's socket in ``<queue>/public/<name>`` (or
    private/, which only Postfix may enter); public/ is reachable by Postfix and
    the postdrop group, which the filtermail units add for this.
    """
    path = Path(getattr(config, key))
    if path.parent != queue_dir / "public" or not SERVICE_NAME.fullmatch(path.name):
        raise ConfigError(
            f"{key} = {path} is invalid: expected {queue_dir}/public/NAME, NAME being"
            " letters, digits, '.', '_' or '-' (Postfix creates the socket of a master.cf"
            " service there)"
        )
    return path.name


def _vmail_uid_range(user: str) -> str:
    """Dovecot's first/last_valid_uid: mail access for the vmail uid only.

    A system user made by adduser gets a uid below Dovecot's default
    first_valid_uid (500), which would refuse every login's mail access.
    """
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:  # rendered where the user does not exist (yet): Dovecot's defaults
        return "first_valid_uid = 500"
    return f"first_valid_uid = {uid}\nlast_valid_uid = {uid}"


def tunnel_host(layout: Layout) -> str:
    """Where Dovecot and Postfix take port 443's mail tunnels: loopback (the local
    relay's own address, 127.0.0.1 in production)."""
    return layout.listen_host or "127.0.0.1"


# Dovecot's own exporter (its stats service): counted from Dovecot's events, served as
# OpenMetrics on a UNIX socket that chatmail-metrics reads at each scrape. Each entry:
# name, event filter, group_by fields ("duration" gets exponential buckets).  Every
# field grouped by has a bounded set of values (cmd_name is "unknown" for a command
# Dovecot does not know), so a client cannot make series without end.
DOVECOT_METRICS = (
    ("auth_success", "event=auth_request_finished AND success=yes", ()),
    ("auth_failure", "event=auth_request_finished AND NOT success=yes", ()),
    ("imap_command", "event=imap_command_finished", ("cmd_name", "tagged_reply_state")),
    ("mail_delivery", "event=mail_delivery_finished", ("duration",)),
    ("imap_hibernated", "event=imap_client_hibernated", ()),
    ("imap_unhibernated", "event=imap_client_unhibernated", ("reason",)),
)
# duration buckets: 10^2 .. 10^7 microseconds (0.1 ms .. 10 s)
DURATION_MAGNITUDES = (2, 7)


def dovecot_stats_socket(layout: Layout) -> Path:
    """Where Dovecot's stats service answers HTTP (GET /metrics) when metrics are on."""
    return layout.dovecot_base_dir / DOVECOT_STATS_NAME


def dovecot_metrics(config: Config, series: str) -> str:
    """The stats service's HTTP listener and the metrics it counts (dovecot.conf), or
    nothing when ``metrics_address`` is empty."""
    if not config.metrics_address:
        return ""
    lo, hi = DURATION_MAGNITUDES
    out = [
        "service stats {",
        "  # OpenMetrics for chatmail-metrics (filtermail's process, the vmail user)",
        f"  unix_listener {DOVECOT_STATS_NAME} {{",
        *(["    type = http"] if series != "2.3" else []),
        f"    user = {config.vmail_user}",
        "    mode = 0600",
        "  }",
        "}",
    ]
    for name, event_filter, group_by in DOVECOT_METRICS:
        out += [f"metric {name} {{", f"  filter = {event_filter}"]
        if series == "2.3" and group_by:
            fields = [f"duration:exponential:{lo}:{hi}:10" if f == "duration" else f
                      for f in group_by]  # fmt: skip
            out.append(f"  group_by = {' '.join(fields)}")
        elif group_by:  # 2.4: a named list, one block per field
            for f in group_by:
                if f == "duration":
                    out += [f"  group_by {f} {{", "    method exponential {",
                            f"      min_magnitude = {lo}", f"      max_magnitude = {hi}",
                            "      base = 10", "    }", "  }"]  # fmt: skip
                else:
                    out += [f"  group_by {f} {{", "  }"]
        out.append("}")
    return "\n".join(out)


def template_variables(config: Config, layout: Layout) -> dict[str, object]:
    """Every value the templates may use (in the syntax of the layout's Dovecot series)."""
    series = layout.dovecot_series or installed_series()
    comps = layout.components
    host = layout.listen_host
    filtering = "filtermail" in comps

    def listen(port: int) -> str:
        return f"{host}:{port}" if host else str(port)

    if host:
        listen_addresses = host
        # every inet service binds host:port (master.cf); inet_interfaces must name an
        # interface's own address, which 127.0.0.2 (an IP-only local relay) is not
        interfaces = "127.0.0.1" if host.startswith("127.") else host
        protocols = "ipv4"
        mynetworks = "127.0.0.0/8"
    else:
        listen_addresses = "*" if config.disable_ipv6 else "*, ::"
        interfaces = "all"
        protocols = "ipv4" if config.disable_ipv6 else "all"
        mynetworks = "127.0.0.0/8" if config.disable_ipv6 else "127.0.0.0/8 [::1]/128"
    queue = layout.postfix_queue_dir
    hibernate_after = 0 if config.imap_compress else config.imap_hibernate_timeout
    tunnel = tunnel_host(layout)

    def filter_socket(path: str) -> str:
        return f"unix:{postfix_path(path, queue)}" if filtering else ""

    log = layout.log_dir
    imap_plugins = ["last_login"] if "lastlogin" in comps else []
    if config.imap_compress and series == "2.3":  # COMPRESS=DEFLATE (RFC 4978): a plugin
        imap_plugins.append("imap_zlib")  # in 2.3; 2.4 has it built in (imap_capability)
    # new-mail events for push notifications come from Lua in LMTP (metadata's script)
    push = "metadata" in comps and (SOURCE_ROOT / "dovecot" / PUSH_LUA).exists()
    lmtp_plugins = (
        ["mail_lua", "notify", "push_notification", "push_notification_lua"] if push else []
    )
    preload = layout.nodelay_so
    if series == "2.3":
        preload_env = f"LD_PRELOAD={preload}" if preload else ""
        imap_extra_plugins = " ".join(imap_plugins)
        lmtp_extra_plugins = " ".join(lmtp_plugins)
    else:  # 2.4: key = value lines inside import_environment { } and mail_plugins { }
        preload_env = f"LD_PRELOAD = {preload}" if preload else ""
        imap_extra_plugins = "\n".join(f"    {p} = yes" for p in imap_plugins)
        lmtp_extra_plugins = "\n".join(f"    {p} = yes" for p in lmtp_plugins)
    return {
        # identity and limits
        "mail_domain": config.mail_domain,
        "mail_domain_bare": config.mail_domain.strip("[]"),
        "myhostname": host_name(config),
        "max_message_size": config.max_message_size,
        "max_mailbox_size_mb": config.max_mailbox_size_mb,
        "quota_expire_target_mb": config.max_mailbox_size_mb * 70 // 100,
        "max_smtp_connections": config.max_smtp_connections,
        "client_connection_limit": max(1, config.max_smtp_connections // 5),
        "imap_client_limit": IMAP_CLIENT_LIMIT,
        "imap_process_limit": -(-config.max_imap_connections // IMAP_CLIENT_LIMIT),
        "vmail_user": config.vmail_user,
        "vmail_uid_range": _vmail_uid_range(config.vmail_user),
        "mailboxes_dir": config.mailboxes_dir,
        # sockets of our dict daemons (and doveauth's HTTP one for Dovecot 2.4)
        "doveauth_socket": config.doveauth_socket,
        "doveauth_http_socket": config.doveauth_http_socket,
        "metadata_socket": config.metadata_socket,
        "lastlogin_socket": config.lastlogin_socket,
        # listeners
        "listen_addresses": listen_addresses,
        "inet_interfaces": interfaces,
        "inet_protocols": protocols,
        "mynetworks": mynetworks,
        "smtp_listen": listen(config.smtp_port),
        "submission_listen": listen(config.submission_port),
        "submissions_listen": listen(config.submissions_port),
        # COMPRESS keeps a client awake anyway
        "imap_hibernate_timeout": f"{hibernate_after}s",
        "imap_port": config.imap_port,
        # port 993: the web process's IMAP front ends TLS (imap_front_port), Dovecot's
        # own TLS only where no web process runs (a local relay without it)
        "dovecot_imaps_port": 0 if "newemail" in layout.components else config.imaps_port,
        "imap_front_port": config.imap_front_port,
        # port 443's mail tunnels from the web process: loopback only
        "tunnel_host": tunnel,
        "imaps_tunnel_port": config.imaps_tunnel_port,
        "submissions_tunnel_listen": f"{tunnel}:{config.submissions_tunnel_port}",
        "smtp_tunnel_listen": f"{tunnel}:{config.smtp_tunnel_port}",
        # Postfix's re-injection smtpd services (public/<name>, see postfix_service)
        "reinject_service": postfix_service(config, "postfix_reinject_socket", queue),
        "reinject_incoming_service": postfix_service(
            config, "postfix_reinject_socket_incoming", queue
        ),
        # filtermail wiring; empty disables the proxy filter / milter in Postfix
        "outgoing_proxy_filter": filter_socket(config.filtermail_smtp_socket),
        "incoming_proxy_filter": filter_socket(config.filtermail_smtp_socket_incoming),
        "non_smtpd_milters": filter_socket(config.filtermail_milter_socket),
        # paths
        "postfix_config_dir": layout.postfix_config_dir,
        "postfix_queue_dir": layout.postfix_queue_dir,
        "postfix_data_dir": layout.postfix_data_dir,
        "postfix_maillog_file": log / "postfix.log" if log else "",
        "postfix_maillog_prefixes": f"{log}, /var, /dev/stdout" if log else "/var, /dev/stdout",
        "dovecot_config_dir": layout.dovecot_config_dir,
        "dovecot_base_dir": layout.dovecot_base_dir,
        "dovecot_state_dir": layout.dovecot_state_dir,
        "dovecot_instance": layout.dovecot_instance,
        "dovecot_log_path": log / "dovecot.log" if log else "syslog",
        # processes report events to the stats service only when metrics are on (the
        # default path): a stopping stats service holds every process up for 5 s
        "dovecot_stats_writer": "stats-writer" if config.metrics_address else "",
        "dovecot_metrics": dovecot_metrics(config, series),
        "dovecot_preload_env": preload_env,
        "push_notification_lua": layout.dovecot_config_dir / PUSH_LUA,
        "dovecot_auth_lua": layout.dovecot_config_dir / AUTH_LUA,
        "imap_extra_plugins": imap_extra_plugins,
        # 2.4 offers COMPRESS by default; a client using it is never hibernated
        "imap_compress_capability": "yes" if config.imap_compress else "no",
        "lmtp_extra_plugins": lmtp_extra_plugins,
        "imap_login_min_avail": layout.imap_login_min_avail,
        # the quota-warning script's command: quota-expire must read this relay's ini
        # (it checks the mailbox path against mailboxes_dir); Dovecot appends its args
        "quota_expire_bin": (
            f"{layout.program('chatmail-quota-expire')}"
            f" --config {layout.ini_path or DEFAULT_CONFIG_PATH}"
        ),
        "tls_cert": layout.tls_cert,
        "tls_key": layout.tls_key,
        # remote delivery: filtermail's transport role (HTTPS first), else the layout's
        "default_transport": remote_transport(config, layout) or layout.default_transport,
        "relay_transport": remote_transport(config, layout) or layout.default_transport,
        "mxdeliv_maxproc": MXDELIV_MAXPROC,
        "smtp_tls_security_level": layout.smtp_tls_security_level,
    }


def remote_transport(config: Config, layout: Layout) -> str | None:
    """Postfix's transport for other domains when filtermail's transport role
    delivers them (HTTPS /mxdeliv, then SMTP), else None (Postfix's smtp)."""
    if not (config.mxdeliv_send and "filtermail" in layout.components):
        return None
    socket = postfix_path(config.filtermail_transport_socket, layout.postfix_queue_dir)
    return f"mxdeliv:unix:{socket}"


def transport_map(peers: Iterable[Peer], via_filtermail: bool) -> str:
    """Postfix's explicit routes: the peers' port 25, unless filtermail's transport
    delivers to them (its routes file, :func:`routes_file`)."""
    lines = ["# explicit routes (texthash: no postmap needed); rewritten by the relay code"]
    if not via_filtermail:
        lines += [f"{p.domain}\tsmtp:[{p.host}]:{p.smtp_port}" for p in peers]
    return "\n".join(lines) + "\n"


def routes_file(peers: Iterable[Peer]) -> str:
    """filtermail transport's --routes: the only destinations of a local relay."""
    lines = ["# domain address smtp_port https_port; rewritten by the relay code"]
    lines += [f"{p.domain} {p.host} {p.smtp_port} {p.https_port}" for p in peers]
    return "\n".join(lines) + "\n"


def write_routes(config: Config, layout: Layout, prefix: Path = Path("/")) -> list[Path]:
    """Write the transport map and the routes file of ``layout.peers`` (atomically)."""
    via_filtermail = remote_transport(config, layout) is not None
    files = [("transport", transport_map(layout.peers, via_filtermail))]
    if layout.root != Path("/"):  # a local relay's (make run): its peers, nothing else
        files.append((MXDELIV_ROUTES, routes_file(layout.peers)))
    written = []
    for name, text in files:
        target = prefix / (layout.postfix_config_dir / name).relative_to("/")
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        written.append(target)
    return written


def raise_kernel_limits(log) -> None:
    """Raise the kernel settings of sysctl/60-chatmaild.conf where they are lower
    (root only; a container's read-only /proc/sys is said, not fatal)."""
    path = SOURCE_ROOT / "sysctl" / "60-chatmaild.conf"
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        proc = Path("/proc/sys") / key.strip().replace(".", "/")
        try:
            if int(proc.read_text()) < int(value):
                proc.write_text(value.strip() + "\n")
        except (OSError, ValueError) as e:
            why = "%s: cannot raise it to %s: %s (IDLE clients past it wait for polling)"
            log.warning(why, key.strip(), value.strip(), e)


def machine_addresses() -> list[str]:
    """Every address of this machine's interfaces (``ip``, iproute2), loopback too."""
    try:
        out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True)
        links = json.loads(out.stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return []
    found = []
    for link in links:
        for info in link.get("addr_info", []):
            address = info.get("local")
            if address and address not in found:
                found.append(address.split("%", 1)[0])
    return found


def _host_only(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback or link-local: no address a call's far end could reach."""
    return ip.is_loopback or ip.is_link_local


def turn_variables(config: Config, layout: Layout, secret: str) -> dict[str, object]:
    """coturn's turnserver.conf of this relay (coturn/turnserver.conf)."""
    lines = []
    addresses = machine_addresses()
    reachable = [a for a in addresses if not _host_only(ipaddress.ip_address(a))]
    if layout.listen_host:  # a local relay: its own address only
        lines.append(f"listening-ip={layout.listen_host}")
        lines.append(f"relay-ip={config.turn_relay_ip or layout.listen_host}")
    elif config.turn_relay_ip:
        lines.append(f"relay-ip={config.turn_relay_ip}")
    elif not reachable:
        # only loopback here (a container): coturn finds no address of its own to
        # relay from and would not start; it serves loopback, where nothing calls
        lines += ["listening-ip=127.0.0.1", "relay-ip=127.0.0.1"]
    own = [f"denied-peer-ip={a}" for a in addresses]
    return {
        "turn_port": config.turn_port,
        "turn_listening": "\n".join(lines),
        "turn_realm": config.mail_domain.strip("[]"),
        "turn_secret": secret,
        "turn_min_port": 49152,
        "turn_max_port": 65535,
        "turn_max_allocations": config.turn_max_allocations,
        "turn_max_bps": config.turn_max_bps,
        "turn_own_addresses": "\n".join(["# the machine's own addresses", *own]),
    }


def render_turn(config: Config, layout: Layout, prefix: Path = Path("/")) -> Path | None:
    """Write coturn's configuration (with the shared secret, made when missing):
    root:turnserver 0640.  None where coturn is not installed."""
    try:
        group = grp.getgrnam("turnserver").gr_gid
    except KeyError:
        return None
    secret_path = prefix / Path(config.turn_secret_path).relative_to("/")
    # production: root's alone (systemd hands chatmail-dict a copy); a local relay's
    # metadata role runs as vmail_user and reads it itself
    owner = -1
    if layout.root != Path("/") and os.geteuid() == 0:
        owner = pwd.getpwnam(config.vmail_user).pw_uid
    secret = ensure_secret(secret_path, uid=owner)
    target = prefix / layout.turn_config.relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    text = render_text(
        (SOURCE_ROOT / "coturn/turnserver.conf").read_text(),
        turn_variables(config, layout, secret),
    )
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    if os.geteuid() == 0:
        os.chown(tmp, 0, group)
    os.replace(tmp, target)
    return target


def render_all(
    config: Config,
    layout: Layout,
    *,
    prefix: Path = Path("/"),
    source_root: Path = SOURCE_ROOT,
) -> list[Path]:
    """Write the Postfix and Dovecot configuration of ``layout``; return the files written.

    Files go to their layout path below ``prefix`` (``/`` installs for real; another
    directory shows what would be installed), their content names the layout paths.
    """
    variables = template_variables(config, layout)

    def dest(path: Path) -> Path:
        return prefix / path.relative_to("/")

    written: list[Path] = []
    for name in POSTFIX_FILES:
        target = dest(layout.postfix_config_dir / name)
        render_file(source_root / "postfix" / name, target, variables)
        written.append(target)
    written += write_routes(config, layout, prefix)
    if "turn" in layout.components:
        turn = render_turn(config, layout, prefix)
        if turn is not None:
            written.append(turn)
    series = layout.dovecot_series or installed_series()
    for template, name in DOVECOT_TEMPLATES[series]:
        target = dest(layout.dovecot_config_dir / name)
        render_file(source_root / "dovecot" / template, target, variables)
        written.append(target)
    for name in DOVECOT_COPIES[series]:
        source = source_root / "dovecot" / name
        if source.exists():
            target = dest(layout.dovecot_config_dir / name)
            shutil.copyfile(source, target)
            written.append(target)
    return written
