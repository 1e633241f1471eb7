"""The one chatmail.ini: typed, validated, defaults in code.

Every daemon and tool reads ``/etc/chatmail/chatmail.ini`` (section ``[params]``)
through :func:`read_config`.  A bad value raises :class:`ConfigError` naming the
key, the value and what is allowed; unknown keys produce one warning.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatmaild.common.addr import valid_addr_spec

# the app builds chatmaild ships (package data), served by the metadata role
APPVERSIONS_PACKAGED = Path(__file__).resolve().parents[1] / "data" / "appversions.json"

DEFAULT_CONFIG_PATH = "/etc/chatmail/chatmail.ini"
SECTION = "params"
POSTFIX_QUEUE_DIR = "/var/spool/postfix"
# filtermail's sockets: inside the queue directory, so Postfix reaches them by a
# path relative to it (works for chrooted Postfix services too)
FILTERMAIL_SOCKET_DIR = f"{POSTFIX_QUEUE_DIR}/filtermail"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--verbose``, the options every chatmaild program takes
    (here, not in service.py, so that light programs need not import the runtime)."""
    parser.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=os.environ.get("CHATMAIL_INI", DEFAULT_CONFIG_PATH),
        help="chatmail.ini to read (default: %(default)s; env CHATMAIL_INI)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")


log = logging.getLogger("chatmaild.common.config")


class ConfigError(Exception):
    """A chatmail.ini problem; the message names the key and what is allowed."""


# --- value parsers: each takes the raw string and returns the typed value or
# raises ValueError with a text saying what is allowed.


def parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "yes", "true", "on"):
        return True
    if low in ("0", "no", "false", "off", ""):
        return False
    raise ValueError("expected a boolean: yes/no, true/false, on/off, 1/0")


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise ValueError("expected a whole number") from None
        if value < lo or (hi is not None and value > hi):
            upper = f"..{hi}" if hi is not None else " or more"
            raise ValueError(f"expected a whole number in {lo}{upper}")
        return value

    parse.__doc__ = f"integer >= {lo}"
    return parse


DEFAULT_TLS_CERT_AND_KEY = ("/etc/chatmail/tls/cert.pem", "/etc/chatmail/tls/key.pem")
LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
# chatmail-acme's state (account, certificates, back-off) and the HTTP-01 answers
# the web process serves on port 80
ACME_STATE_DIR = Path("/var/lib/chatmaild/acme")
ACME_CHALLENGE_DIR = ACME_STATE_DIR / "challenges"


def parse_metrics_address(raw: str) -> str:
    text = raw.strip()
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, as 127.0.0.1:9390 or [::1]:9390")
    return text


def parse_port(raw: str) -> int:
    return _int_in(1, 65535)(raw)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(raw: str) -> int:
    """A byte size: ``31457280``, ``500M``, ``2G``, ``100MB``, ``64KiB``."""
    m = _SIZE_RE.match(raw)
    if not m:
        raise ValueError("expected a size like 31457280, 500M, 2G or 64K")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def format_size(n: int) -> str:
    """A byte count as ini text that :func:`parse_size` and :func:`parse_size_mb` read back."""
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"  # explicit unit: a bare number would mean MB to parse_size_mb


def parse_size_mb(raw: str) -> int:
    """Like :func:`parse_size`, but a bare number means megabytes (reference syslimits)."""
    if raw.strip().isdigit():
        return int(raw.strip()) * 1024**2
    return parse_size(raw)


def parse_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number such as 5 or 2.5") from None
    if value <= 0:
        raise ValueError("expected a number greater than 0")
    return value


def parse_str(raw: str) -> str:
    return raw.strip()


def parse_abspath(raw: str) -> str:
    value = raw.strip()
    if not value.startswith("/"):
        raise ValueError("expected an absolute path starting with /")
    if "\0" in value:
        raise ValueError("expected a path without NUL bytes")
    return value


def parse_optional_abspath(raw: str) -> str:
    return parse_abspath(raw) if raw.strip() else ""


def parse_user(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", value):
        raise ValueError("expected a system user name like vmail")
    return value


_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def parse_mail_domain(raw: str) -> str:
    """An FQDN (lowercased), or a bare IPv4 address which becomes ``[a.b.c.d]``."""
    value = raw.strip().lower().rstrip(".")
    try:
        ip = ipaddress.IPv4Address(value.strip("[]"))
    except ValueError:
        pass
    else:
        return f"[{ip}]"
    if not _DOMAIN_RE.match(value) or "." not in value:
        raise ValueError(
            "expected a fully qualified domain name like chat.example.org or an IPv4 address"
        )
    return value


def parse_cert_and_key(raw: str) -> tuple[str, str] | None:
    parts = raw.split()
    if not parts:
        return None
    if len(parts) != 2 or not all(p.startswith("/") for p in parts):
        raise ValueError("expected two absolute paths: CERTFILE KEYFILE")
    return parts[0], parts[1]


def parse_url(raw: str) -> str:
    value = raw.strip()
    if value and not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _address_list(raw: str) -> list[str]:
    return raw.replace(",", " ").split()


def parse_addresses(raw: str) -> tuple[str, ...]:
    """Space-separated e-mail addresses (lower-cased)."""
    out = []
    for entry in _address_list(raw):
        addr = valid_addr_spec(entry)
        if addr is None:
            raise ValueError(f"{entry!r} is not an e-mail address; expected addresses like a@b.org")
        out.append(addr)
    return tuple(out)


def parse_addresses_or_domains(raw: str) -> tuple[str, ...]:
    """Space-separated e-mail addresses or ``@domain`` entries (lower-cased)."""
    out = []
    for entry in _address_list(raw):
        addr = valid_addr_spec("x" + entry if entry.startswith("@") else entry)
        if addr is None:
            raise ValueError(
                f"{entry!r} is neither an e-mail address nor @domain; "
                "expected entries like a@b.org or @b.org"
            )
        out.append(addr[1:] if entry.startswith("@") else addr)
    return tuple(out)


def _key(
    parse: Callable[[str], Any], doc: str, default: Any = dataclasses.MISSING, **kw: Any
) -> Any:
    """A config key: its parser and one-line doc travel as dataclass field metadata."""
    meta = {"parse": parse, "doc": doc}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    if isinstance(default, (list, dict, tuple)) and default:
        return field(default_factory=lambda: default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Effective chatmail configuration; attribute names are the ini keys."""

    # -- identity
    mail_domain: str = _key(parse_mail_domain, "the relay's mail domain (FQDN or IPv4)")

    # -- accounts
    username_min_length: int = _key(_int_in(1, 64), "shortest localpart allowed at creation", 9)
    username_max_length: int = _key(_int_in(1, 64), "longest localpart allowed at creation", 9)
    password_min_length: int = _key(_int_in(1, 1024), "shortest password allowed at creation", 9)
    mailboxes_dir: str = _key(parse_abspath, "directory holding one directory per account", "")
    vmail_user: str = _key(parse_user, "system user owning mail (userdb uid/gid)", "vmail")
    nocreate_file: str = _key(
        parse_abspath, "if this file exists, no new accounts are created", "/etc/chatmail-nocreate"
    )
    passdb_path: str = _key(
        parse_abspath, "legacy sqlite passdb (read only for migration)", "/home/vmail/passdb.sqlite"
    )

    # -- registration refusal under load (reference syslimits)
    max_load_1m: float = _key(parse_float, "refuse new accounts above this 1-minute load", 5.0)
    min_available_memory: int = _key(
        parse_size_mb, "refuse new accounts below this available memory", 200 * 1024**2
    )
    min_free_disk_space: int = _key(
        parse_size_mb, "refuse new accounts below this free space in mailboxes_dir", 1024**3
    )

    # -- limits
    max_user_send_per_minute: int = _key(_int_in(1), "outgoing messages per sender per minute", 60)
    max_user_send_burst_size: int = _key(_int_in(1), "outgoing burst before the rate applies", 10)
    max_mailbox_size: int = _key(parse_size, "mailbox quota", 500 * 1024**2)
    max_message_size: int = _key(parse_size, "largest message accepted", 31457280)
    max_imap_connections: int = _key(
        _int_in(1), "IMAP connections served at once (Dovecot imap processes of 10)", 10000
    )
    max_smtp_connections: int = _key(_int_in(5), "Postfix submission process limit", 1000)

    # -- expiry (days)
    delete_mails_after: int = _key(_int_in(1), "days after which every message is deleted", 20)
    delete_large_after: int = _key(_int_in(1), "days after which fetched large messages go", 7)
    delete_inactive_users_after: int = _key(
        _int_in(1), "days without login after which an account is removed", 90
    )
    large_message_size: int = _key(parse_size, "threshold for delete_large_after", 200000)

    # -- dict daemons (UNIX sockets Dovecot connects to)
    doveauth_socket: str = _key(
        parse_abspath, "doveauth dict socket", "/run/doveauth/doveauth.socket"
    )
    doveauth_http_socket: str = _key(
        parse_abspath,
        "doveauth HTTP socket (Dovecot 2.4's Lua passdb/userdb)",
        "/run/doveauth/doveauth-http.socket",
    )
    metadata_socket: str = _key(
        parse_abspath, "chatmail-metadata dict socket", "/run/chatmail-metadata/metadata.socket"
    )
    lastlogin_socket: str = _key(
        parse_abspath, "lastlogin dict socket", "/run/chatmail-lastlogin/lastlogin.socket"
    )

    # -- filtermail and Postfix re-injection: UNIX sockets, so that file permissions
    # decide who may connect (a loopback TCP port is open to every local user)
    filtermail_smtp_socket: str = _key(
        parse_abspath,
        "outgoing filter socket (submission's smtpd_proxy_filter); filtermail's socket"
        " directories are owned by vmail_user, group postfix, mode 2750",
        f"{FILTERMAIL_SOCKET_DIR}/outgoing.sock",
    )
    filtermail_smtp_socket_incoming: str = _key(
        parse_abspath,
        "incoming filter socket (port 25's smtpd_proxy_filter)",
        f"{FILTERMAIL_SOCKET_DIR}/incoming.sock",
    )
    filtermail_milter_socket: str = _key(
        parse_abspath, "DKIM signing milter socket", f"{FILTERMAIL_SOCKET_DIR}/milter.sock"
    )
    filtermail_transport_socket: str = _key(
        parse_abspath,
        "remote delivery socket (LMTP from Postfix's default_transport: HTTPS /mxdeliv, then SMTP)",
        f"{FILTERMAIL_SOCKET_DIR}/transport.sock",
    )
    postfix_reinject_socket: str = _key(
        parse_abspath,
        "Postfix outgoing re-injection socket: <queue_directory>/public/<service name>",
        f"{POSTFIX_QUEUE_DIR}/public/reinject",
    )
    postfix_reinject_socket_incoming: str = _key(
        parse_abspath,
        "Postfix incoming re-injection socket: <queue_directory>/public/<service name>",
        f"{POSTFIX_QUEUE_DIR}/public/reinject_incoming",
    )
    passthrough_senders: tuple[str, ...] = _key(
        parse_addresses,
        "senders whose unencrypted mail may leave (addresses, space-separated)",
        (),
    )
    passthrough_recipients: tuple[str, ...] = _key(
        parse_addresses_or_domains,
        "recipients (addresses or @domains) who may get unencrypted mail from our"
        " users; every recipient of a message must match",
        (),
    )
    filtermail_idle_timeout: float = _key(
        parse_float, "seconds filtermail waits for the next SMTP input before 421", 300.0
    )
    filtermail_session_timeout: float = _key(
        parse_float, "longest filtermail SMTP session in seconds", 1800.0
    )

    # -- DKIM
    dkim_selector: str = _key(parse_str, "DKIM selector", "opendkim")
    dkim_key_path: str = _key(
        parse_abspath, "DKIM private key (PEM)", "/etc/dkimkeys/opendkim.private"
    )
    dns_resolver: str = _key(
        parse_str, "DNS server for DKIM key lookups, host[:port]; empty = system resolver", ""
    )
    dkim_dns_timeout: float = _key(
        parse_float, "seconds a DKIM key lookup may take before a temporary 451", 20.0
    )

    # -- push notifications and metadata
    notification_url: str = _key(
        parse_url, "push notification endpoint", "https://notifications.delta.chat/notify"
    )
    notification_dir: str = _key(parse_abspath, "queue of pending push notifications", "")
    iroh_relay: str = _key(
        parse_url,
        "iroh relay URL advertised to clients (realtime apps); empty: this relay's own"
        " (https://mail_domain, chatmail-iroh) when it runs and the certificate is a CA's,"
        " else none (the apps use their defaults)",
        "",
    )
    iroh_relay_port: int = _key(
        _int_in(0, 65535),
        "loopback port of chatmail-iroh, this relay's own iroh relay (HTTPS /relay goes"
        " there); 0: none",
        3340,
    )
    iroh_relay_max_clients: int = _key(
        _int_in(1, 1_000_000), "iroh relay connections at once, in all", 4096
    )
    iroh_relay_max_clients_per_ip: int = _key(
        _int_in(1, 1_000_000), "iroh relay connections at once from one IPv4 address or /64", 32
    )
    iroh_relay_max_bps: int = _key(
        _int_in(8000, 10**9), "bytes a second one iroh relay client may send", 1_000_000
    )
    appversions_path: str = _key(
        parse_optional_abspath,
        "JSON file of current app builds (METADATA appversions); unset: the packaged"
        " chatmaild/data/appversions.json, empty: not served",
        None,
    )
    turn_port: int = _key(parse_port, "TURN server port (coturn, UDP and TCP)", 3478)
    turn_secret_path: str = _key(
        parse_abspath,
        "secret shared with coturn for TURN credentials (created by chatmaild setup, root"
        " only; chatmail-dict gets a copy from systemd)",
        "/etc/chatmail/turn.secret",
    )
    turn_credentials_ttl: int = _key(
        _int_in(13 * 3600, 30 * 86400),
        "seconds TURN credentials stay valid (the apps ask again 12 hours before)",
        86400,
    )
    turn_relay_ip: str = _key(
        parse_str,
        "address coturn relays calls from (relay-ip); empty: every address of the machine"
        " (make run: its loopback address)",
        "",
    )
    turn_max_allocations: int = _key(
        _int_in(1, 1_000_000), "TURN relay allocations at once, in all", 2000
    )
    turn_max_bps: int = _key(
        _int_in(8000, 10**9), "bytes a second one TURN allocation may relay", 500_000
    )
    turn_socket_path: str = _key(
        parse_abspath,
        "chatmail-turn's credentials socket: asked when coturn does not serve TURN here",
        "/run/chatmail-turn/turn.socket",
    )
    notification_concurrency: int = _key(
        _int_in(1, 1024), "push notification requests in flight at once", 32
    )
    notification_timeout: float = _key(parse_float, "seconds one push request may take", 60.0)
    notification_retry_delay: float = _key(
        parse_float,
        "seconds before the first push retry; later retries wait 8x longer each, and a"
        " notification is dropped after 2250x this (8 s: ladder 0/8/64/512/4096 s, 5 h)",
        8.0,
    )

    # -- Postfix / Dovecot / web
    smtp_port: int = _key(parse_port, "MTA port (incoming relay mail)", 25)
    submission_port: int = _key(parse_port, "STARTTLS submission port", 587)
    submissions_port: int = _key(parse_port, "implicit-TLS submission port", 465)
    imap_port: int = _key(parse_port, "IMAP STARTTLS port", 143)
    imaps_port: int = _key(parse_port, "IMAP implicit-TLS port", 993)
    newemail_port: int = _key(parse_port, "HTTPS onboarding endpoint port", 443)
    http_port: int = _key(
        parse_port, "plain HTTP port: ACME challenges, everything else redirected to HTTPS", 80
    )
    imaps_tunnel_port: int = _key(
        parse_port,
        "loopback port of Dovecot's implicit-TLS IMAP for clients reaching it through"
        " newemail_port (ALPN imap; PROXY protocol)",
        10993,
    )
    imap_front_port: int = _key(
        parse_port,
        "loopback port of Dovecot's plaintext IMAP for clients whose TLS chatmail-newemail"
        " ended on imaps_port (PROXY protocol v2)",
        10143,
    )
    mxdeliv_send: bool = _key(
        parse_bool,
        "deliver to other relays over HTTPS (POST https://<mx>/mxdeliv) first, then over"
        " SMTP port 25; no: SMTP only, by Postfix itself",
        True,
    )
    mxdeliv_receive: bool = _key(
        parse_bool,
        "take mail from other relays over HTTPS (POST /mxdeliv on newemail_port); no: the"
        " route answers 404 and they use port 25",
        True,
    )
    mxdeliv_timeout: float = _key(
        parse_float, "seconds one delivery to another relay may take, over HTTPS or SMTP", 60.0
    )
    smtp_tunnel_port: int = _key(
        parse_port,
        "loopback port of Postfix's port-25 service for mail other relays deliver over"
        " HTTPS (POST /mxdeliv on newemail_port; PROXY protocol)",
        10025,
    )
    submissions_tunnel_port: int = _key(
        parse_port,
        "loopback port of Postfix's implicit-TLS submission for clients reaching it"
        " through newemail_port (ALPN smtp; PROXY protocol)",
        10465,
    )
    web_max_connections: int = _key(
        _int_in(1, 1_000_000), "connections the web port holds open at once, in all", 1024
    )
    web_max_connections_per_ip: int = _key(
        _int_in(1, 1_000_000),
        "connections the web port holds open at once from one IPv4 address or IPv6 /64",
        32,
    )
    web_max_handshakes: int = _key(
        _int_in(1, 100_000), "TLS handshakes in progress at once on the web port", 64
    )
    web_handshake_rate: int = _key(
        _int_in(1, 1_000_000),
        "TLS handshakes a second on the web port from one IPv4 address or IPv6 /64"
        " (twice as many at once)",
        10,
    )
    disable_ipv6: bool = _key(parse_bool, "IPv4 only", False)
    imap_rawlog: bool = _key(parse_bool, "keep raw IMAP logs per user", False)
    imap_compress: bool = _key(parse_bool, "enable IMAP COMPRESS (disables hibernation)", False)
    imap_hibernate_timeout: int = _key(
        _int_in(0, 3600),
        "seconds an IMAP client in IDLE stays awake before Dovecot hibernates it (its imap"
        " process ends until mail or a command wakes it); 0: never",
        10,
    )
    tls_external_cert_and_key: tuple[str, str] | None = _key(
        parse_cert_and_key, "CERTFILE KEYFILE of an externally managed certificate", None
    )
    metrics_address: str = _key(
        parse_metrics_address,
        "HOST:PORT where chatmail-metrics serves Prometheus metrics (/metrics); empty: no"
        " metrics at all (the default). A public address only if you mean it: the"
        " figures say how busy the relay is (mtail_address is the old name)",
        "",
    )
    metrics_dir: str = _key(
        parse_abspath,
        "where each chatmaild process keeps its counters for chatmail-metrics (they"
        " survive restarts)",
        "/var/lib/chatmaild/metrics",
    )
    acme_email: str = _key(parse_str, "ACME contact", "")
    acme_directory: str = _key(
        parse_url,
        "ACME directory URL the certificate comes from (empty: a self-signed one)",
        LETSENCRYPT_DIRECTORY,
    )
    www_folder: str = _key(
        parse_optional_abspath, "directory of an own static website served instead of ours", ""
    )
    privacy_mail: str = _key(parse_str, "privacy contact mail", "")
    privacy_postal: str = _key(parse_str, "privacy contact postal address", "")
    privacy_pdo: str = _key(parse_str, "privacy data officer", "")
    privacy_supervisor: str = _key(parse_str, "privacy supervisor", "")

    # ini keys that were read but are not known; reported once as a warning
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)
    # ini keys that are still accepted but have no effect (DEPRECATED_KEYS)
    deprecated_keys: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        bare = self.mail_domain.strip("[]")
        defaults = {
            "mailboxes_dir": f"/home/vmail/mail/{bare}",
            "notification_dir": None,  # filled below, depends on mailboxes_dir
        }
        if not self.mailboxes_dir:
            object.__setattr__(self, "mailboxes_dir", defaults["mailboxes_dir"])
        if not self.notification_dir:
            object.__setattr__(
                self, "notification_dir", str(Path(self.mailboxes_dir) / "pending_notifications")
            )
        # unset and empty differ (as in the reference): empty turns it off
        if self.appversions_path is None:
            object.__setattr__(self, "appversions_path", str(APPVERSIONS_PACKAGED))
        if self.username_min_length > self.username_max_length:
            raise ConfigError(
                f"username_min_length = {self.username_min_length} is greater than "
                f"username_max_length = {self.username_max_length}; allowed: min <= max"
            )

    # -- derived values

    @property
    def is_ip_domain(self) -> bool:
        return self.mail_domain.startswith("[")

    @property
    def tls_cert_and_key(self) -> tuple[str, str]:
        """The certificate and key every TLS listener serves: the operator's, else the
        ones chatmaild setup makes and chatmail-acme renews."""
        return self.tls_external_cert_and_key or DEFAULT_TLS_CERT_AND_KEY

    @property
    def certificate_names(self) -> tuple[str, ...]:
        """The names the relay's certificate covers (MTA-STS's policy host too)."""
        bare = self.mail_domain.strip("[]")
        return (bare,) if self.is_ip_domain else (bare, f"mta-sts.{bare}")

    @property
    def max_mailbox_size_mb(self) -> int:
        return self.max_mailbox_size // 1024**2

    @property
    def mailboxes_path(self) -> Path:
        return Path(self.mailboxes_dir)

    def as_ini_items(self) -> list[tuple[str, str, str]]:
        """(key, effective value as ini text, doc) for every key, for ``chatmaild config``."""
        items = []
        for f in config_fields():
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = " ".join(value)
            elif value is None:
                text = ""
            elif f.metadata["parse"] in (parse_size, parse_size_mb):
                text = format_size(value)
            else:
                text = str(value)
            items.append((f.name, text, f.metadata["doc"]))
        return items


def config_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if "parse" in f.metadata]


KNOWN_KEYS = frozenset(f.name for f in config_fields())
# keys of the reference's ini that this suite accepts silently but does not use
IGNORED_KEYS = frozenset(
    {
        "filtermail_http_port_incoming",
        "filtermail_lmtp_port_transport",
    }
)
# keys of loopback TCP endpoints that became UNIX sockets (any local user could
# connect to a port): accepted so that an existing chatmail.ini still starts,
# their values unused; old key -> the key that replaced it ("" if none)
DEPRECATED_KEYS = {
    "filtermail_smtp_port": "filtermail_smtp_socket",
    "filtermail_smtp_port_incoming": "filtermail_smtp_socket_incoming",
    "filtermail_milter_port": "filtermail_milter_socket",
    "postfix_reinject_port": "postfix_reinject_socket",
    "postfix_reinject_port_incoming": "postfix_reinject_socket_incoming",
    "filtermail_host": "",
    "postfix_host": "",
}


# old key -> its new name: the old one still works when the new one is not set
RENAMED_KEYS = {"mtail_address": "metrics_address"}


def deprecation_warning(keys: Iterable[str]) -> str:
    """One line naming each deprecated key and what replaced it."""
    names = [f"{k} (see {DEPRECATED_KEYS[k]})" if DEPRECATED_KEYS[k] else k for k in keys]
    return (
        "no longer used, filtermail and Postfix re-injection talk over UNIX sockets now;"
        " remove: " + ", ".join(names)
    )


def parse_params(params: dict[str, str], source: str = "chatmail.ini") -> Config:
    """Build a Config from raw ``key -> text`` pairs, raising ConfigError on the first bad key."""
    values: dict[str, Any] = {}
    for f in config_fields():
        if f.name not in params:
            continue
        raw = params[f.name]
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as e:
            raise ConfigError(f"{source}: {f.name} = {raw!r} is invalid: {e}") from None
    if "mail_domain" not in values:
        raise ConfigError(f"{source}: required key mail_domain is missing from [{SECTION}]")
    for old, new in RENAMED_KEYS.items():
        if old in params and new not in params and new not in values:
            try:
                values[new] = next(f for f in config_fields() if f.name == new).metadata["parse"](
                    params[old]
                )
            except ValueError as e:
                raise ConfigError(f"{source}: {old} = {params[old]!r} is invalid: {e}") from None
    unknown = tuple(
        sorted(set(params) - KNOWN_KEYS - IGNORED_KEYS - set(DEPRECATED_KEYS) - set(RENAMED_KEYS))
    )
    deprecated = tuple(k for k in DEPRECATED_KEYS if k in params)
    try:
        return Config(**values, unknown_keys=unknown, deprecated_keys=deprecated)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_config(path: str | Path = DEFAULT_CONFIG_PATH, *, warn_unknown: bool = True) -> Config:
    """Read and validate chatmail.ini; raise ConfigError with a precise message."""
    path = Path(path)
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        with open(path, encoding="utf-8") as fp:
            parser.read_file(fp)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: malformed ini: {e.message}") from None
    if not parser.has_section(SECTION):
        raise ConfigError(f"{path}: missing section [{SECTION}]")
    config = parse_params(dict(parser.items(SECTION)), source=str(path))
    if warn_unknown and config.unknown_keys:
        log.warning(
            "%s: ignoring unknown keys in [%s]: %s", path, SECTION, ", ".join(config.unknown_keys)
        )
    if warn_unknown and config.deprecated_keys:
        log.warning("%s: %s", path, deprecation_warning(config.deprecated_keys))
    return config


def write_config(path: str | Path, **params: Any) -> Path:
    """Write a minimal chatmail.ini with the given keys (used by tests and ``make run``)."""
    path = Path(path)
    lines = [f"[{SECTION}]"]
    for key, value in params.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
