"""Shared daemon runtime: argv, config, logging, sockets, sd_notify, graceful stop.

A daemon module supplies a :class:`Daemon` (connection handler plus optional
background work) and calls :func:`run_daemon`; nothing else is per-daemon.

Lifecycle: parse ``--config`` -> validate config -> set up logging (journald
under systemd, stderr otherwise) -> take the listening socket from systemd
(``LISTEN_FDS``) or bind it -> ``READY=1`` -> serve.  SIGTERM/SIGINT stop
accepting, send ``STOPPING=1``, let in-flight requests finish (bounded by
``--stop-timeout``), close idle connections and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from chatmaild.common.config import Config, ConfigError, add_config_arguments, read_config

SD_LISTEN_FDS_START = 3
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h, also systemd's "not configured"


# ---------------------------------------------------------------- logging


# the role a log record belongs to when one process serves several roles: set
# while a role starts and while it serves a connection (tasks inherit it)
CURRENT_ROLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("role", default=None)


class RoleFilter(logging.Filter):
    """Name each record's role: the role being served, else a role's own logger, else ``prog``.

    Sets ``record.role`` (the stderr prefix) and ``record.SYSLOG_IDENTIFIER``
    (python-systemd sends record attributes as journal fields), so every line of
    a process that serves several roles says which one wrote it.
    """

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog
        self.roles: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        role = CURRENT_ROLE.get()
        if role is None:
            top = record.name.split(".", 1)[0]
            role = record.name if record.name in self.roles else top if top in self.roles else None
        record.role = role or self.prog
        record.SYSLOG_IDENTIFIER = record.role
        return True


def setup_logging(prog: str, *, verbose: bool = False) -> logging.Logger:
    """Log to journald when started by systemd, else to stderr; return the daemon's logger."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found]

            handler = JournalHandler(SYSLOG_IDENTIFIER=prog)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(role)s[%(process)d] %(levelname)s %(message)s")
        )
    handler.addFilter(RoleFilter(prog))
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(prog)


def register_roles(names: Iterable[str]) -> None:
    """Tell the log handlers which logger names are roles of this process."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, RoleFilter):
                f.roles.update(names)


# ---------------------------------------------------------------- sd_notify


def sd_notify(state: str) -> None:
    """Tell systemd about our state if it asked (NOTIFY_SOCKET); a no-op otherwise."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon as sd_daemon  # type: ignore[import-not-found]

        with contextlib.suppress(OSError):  # systemd gone (or never there): nothing to tell
            sd_daemon.notify(state)
        return
    except ImportError:
        pass
    # python-systemd missing: the protocol is one datagram, so speak it directly
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)


# ---------------------------------------------------------------- sockets


@dataclass(frozen=True)
class Endpoint:
    """Where a daemon listens: a UNIX socket path or a TCP host:port.

    A UNIX socket is owner-only by default: every Dovecot process that talks to
    our dict daemons (auth-worker, imap, lmtp) runs as the vmail user, as the
    daemons do, and any wider mode would let other local users in.
    """

    path: str | None = None
    host: str | None = None
    port: int | None = None
    mode: int = 0o600

    @classmethod
    def unix(cls, path: str, mode: int = 0o600) -> Endpoint:
        return cls(path=path, mode=mode)

    @classmethod
    def tcp(cls, host: str, port: int) -> Endpoint:
        return cls(host=host, port=port)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``/path/to.sock`` or ``host:port`` / ``[v6]:port``."""
        if text.startswith("/"):
            return cls.unix(text)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"not a socket path or host:port: {text!r}")
        return cls.tcp(host.strip("[]") or "127.0.0.1", int(port))

    def __str__(self) -> str:
        return self.path if self.path else f"{self.host}:{self.port}"


def systemd_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation, if they are meant for this process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    return [socket.socket(fileno=fd) for fd in fds]


def bind_socket(endpoint: Endpoint, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """Bind a listening socket, replacing a stale UNIX socket file but never a live one."""
    if endpoint.path:
        path = Path(endpoint.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale: nobody answers
            else:
                raise OSError(f"{path} is in use by another process")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~endpoint.mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, endpoint.mode)
    else:
        infos = socket.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------- daemon base


class Daemon:
    """Base for a served daemon; override :meth:`handle_connection`.

    ``request()`` marks work that graceful stop must let finish; connections
    that are only waiting for input are closed at stop.
    """

    name = "daemon"
    # longest line (or HTTP head) a connection's reader buffers; protocols enforce
    # their own, often smaller, limits
    stream_limit = 2**20
    # uvloop (about twice asyncio's throughput, 1.1 to 1.5 MB of RSS more)
    fast_loop = True

    def __init__(self, config: Config, args: argparse.Namespace | None = None) -> None:
        self.config = config
        self.args = args
        self.log = logging.getLogger(self.name)
        self.stopping = asyncio.Event()
        # where it listens (its endpoint() or --listen's), known before start()
        self.listen_endpoint: Endpoint | None = None
        # what the roles of one process share (run_daemons gives them one dict), by name
        self.shared: dict[str, object] = {}
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def endpoint(self) -> Endpoint:
        raise NotImplementedError

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS for a TCP endpoint, handshake done before handle_connection; None: plain."""
        return None

    async def start(self) -> None:
        """Start background work before the socket is served."""

    async def stop(self) -> None:
        """Stop background work after connections are done."""

    def reload(self) -> None:
        """SIGHUP: read again what may change while running (a renewed certificate)."""

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        raise NotImplementedError

    def protocol_factory(self) -> Callable[[], asyncio.BaseProtocol] | None:
        """An asyncio protocol of the daemon's own per connection (an HTTP server
        library's, say) instead of :meth:`handle_connection`; asked after start().
        Its connections are the daemon's to end in stop()."""
        return None

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if the timeout hit first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class Server:
    """Runs one Daemon on its socket until stopped."""

    def __init__(self, daemon: Daemon, sock: socket.socket, stop_timeout: float = 30.0):
        self.daemon = daemon
        self.sock = sock
        self.stop_timeout = stop_timeout
        self.connections: set[asyncio.Task] = set()
        self._server: asyncio.base_events.Server | None = None
        self._stopped = asyncio.Event()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        CURRENT_ROLE.set(self.daemon.name)  # this connection's task only
        self.connections.add(task)
        try:
            await self.daemon.handle_connection(reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            self.daemon.log.exception("connection handler failed; connection closed")
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def start(self) -> None:
        # background tasks the role starts inherit its name for their log lines
        token = CURRENT_ROLE.set(self.daemon.name)
        try:
            await self.daemon.start()
        finally:
            CURRENT_ROLE.reset(token)
        # backlog: asyncio would otherwise listen() again with 100, and a burst of
        # connects (Dovecot opening many dict connections) would get EAGAIN.
        opts: dict = {"sock": self.sock, "backlog": LISTEN_BACKLOG}
        if self.sock.family != socket.AF_UNIX:
            tls = self.daemon.ssl_context()
            if tls is not None:
                opts.update(ssl=tls, ssl_handshake_timeout=10)
        factory = self.daemon.protocol_factory()
        if factory is not None:
            self._server = await asyncio.get_running_loop().create_server(factory, **opts)
            return
        opts["limit"] = self.daemon.stream_limit
        if self.sock.family == socket.AF_UNIX:
            if sys.version_info >= (3, 13):
                # 3.13 would unlink the socket file at close, even one systemd
                # handed over (LISTEN_FDS); run_daemon removes the files it bound
                opts["cleanup_socket"] = False
            self._server = await asyncio.start_unix_server(self._on_connect, **opts)
        else:
            self._server = await asyncio.start_server(self._on_connect, **opts)

    async def stop(self) -> None:
        """Graceful stop: no new connections, finish in-flight work, close the rest."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.daemon.stopping.set()
        if self._server is not None:
            self._server.close()
        if not await self.daemon.drain(self.stop_timeout):
            self.daemon.log.warning("stop: requests still running after %ss", self.stop_timeout)
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=5)
        await self.daemon.stop()

    def where(self) -> str:
        name = self.sock.getsockname()
        if isinstance(name, tuple):
            return f"{name[0]}:{name[1]}"
        return name or "inherited socket"

    async def serve_until_signal(self) -> None:
        await serve_until_signal([self])


def _reload(daemons: Sequence[Daemon]) -> None:
    for daemon in daemons:
        try:
            daemon.reload()
        except Exception as e:  # noqa: BLE001 (a failed reload keeps what runs)
            daemon.log.error("reload failed, keeping the running state: %s", e)
        else:
            daemon.log.info("reloaded")


async def serve_until_signal(servers: Sequence[Server]) -> None:
    """Start every role's server, READY=1 once all listen, stop them all on SIGTERM/SIGINT.

    A role whose start fails ends the process (systemd restarts it); a failing
    connection handler only closes that connection (Server._on_connect).
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, [server.daemon for server in servers])
    started: list[Server] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
            server.daemon.log.info("listening on %s", server.where())
        sd_notify("READY=1")
        await stop_requested.wait()
    finally:
        for server in started:
            server.daemon.log.info("stopping")
        sd_notify("STOPPING=1")
        await asyncio.gather(*(server.stop() for server in started))
        for server in started:
            server.daemon.log.info("stopped")


# ---------------------------------------------------------------- command line


def make_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argparse parser whose --help reads like a man page, built from a module docstring.

    The docstring's first line is the NAME summary; the rest is DESCRIPTION and
    may contain FILES/SIGNALS/EXIT STATUS sections.
    """
    summary, _, body = (doc or prog).strip().partition("\n")
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{prog} - {summary.strip()}\n\n" + textwrap.dedent(body).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    return parser


def load_config_or_exit(path: str, prog: str) -> Config:
    try:
        return read_config(path)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def raise_fd_limit(log: logging.Logger) -> None:
    """Soft open-files limit up to the hard one: Dovecot may hold thousands of
    connections to one dict daemon, and the usual soft limit is 1024."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open files limit: %s", e)


def run_daemon(
    daemon_class: type[Daemon],
    doc: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Entry point shared by every socket daemon."""
    return run_daemons(daemon_class.name, lambda args: [daemon_class], doc, argv, add_arguments)


def listen_overrides(
    values: Sequence[str], names: Sequence[str], single: str | None = None
) -> dict[str, Endpoint]:
    """``--listen`` values -> endpoint per role name: ``SOCKET`` alone with one role
    (or ``single``: the one role the command line named), else ``ROLE=SOCKET``."""
    overrides: dict[str, Endpoint] = {}
    single = single or (names[0] if len(names) == 1 else None)
    for value in values:
        role, sep, where = value.partition("=")
        if sep and role in names:
            overrides[role] = Endpoint.parse(where)
        elif single is not None:
            overrides[single] = Endpoint.parse(value)
        else:
            raise ValueError(f"--listen {value}: name the role (one of {', '.join(names)})")
    return overrides


# sockets systemd passed that no role's endpoint took, by path: a role's second
# socket (doveauth's HTTP one) takes its own with take_inherited()
_SPARE_INHERITED: dict[str, socket.socket] = {}


def inherited_for(endpoints: Sequence[Endpoint], inherited: list[socket.socket]):
    """Match sockets passed by systemd to endpoints: by path, or the one to the one.

    The ones left over wait in _SPARE_INHERITED for take_inherited()."""
    if len(endpoints) == 1 and len(inherited) == 1:
        return [inherited[0]]
    by_path: dict[str, socket.socket] = {}
    for sock in inherited:
        with contextlib.suppress(OSError):
            name = sock.getsockname()
            if isinstance(name, str) and name:
                by_path[name] = sock
    matched = [by_path.pop(e.path, None) if e.path else None for e in endpoints]
    _SPARE_INHERITED.update(by_path)
    return matched


def take_inherited(path: str) -> socket.socket | None:
    """The listening socket systemd passed for ``path`` (a .socket unit), if any."""
    return _SPARE_INHERITED.pop(path, None)


class BoundUnixSocket:
    """A socket file this process bound (not one systemd holds open across restarts).

    ``remove()`` unlinks it only while the file is still this socket's: during an
    upgrade a .socket unit may have bound a new one at the same path."""

    def __init__(self, path: str) -> None:
        self.path = path
        st = os.stat(path)
        self._ident = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)


def open_listener(
    endpoint: Endpoint, inherited: socket.socket | None = None
) -> tuple[socket.socket, BoundUnixSocket | None]:
    """A non-blocking listening socket for ``endpoint``: ``inherited`` (systemd's) when
    given, else one bound here, with its socket file to remove at exit (UNIX only)."""
    if inherited is not None:
        sock, socket_file = inherited, None
    else:
        sock = bind_socket(endpoint)
        socket_file = BoundUnixSocket(endpoint.path) if endpoint.path else None
    sock.setblocking(False)
    return sock, socket_file


def run_daemons(
    prog: str,
    roles_of: Callable[[argparse.Namespace], Sequence[type[Daemon]]],
    doc: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    config_roles: Callable[[Config, argparse.Namespace], Sequence[type[Daemon]]] | None = None,
) -> int:
    """One process serving one or more roles, each on its own socket, in one event loop.

    ``roles_of(args)`` names the Daemon classes to run; ``config_roles(config, args)``
    those chatmail.ini switches on besides (the metrics endpoint, the iroh relay).
    Each role keeps its config keys, socket and log name; they share the interpreter, the libraries
    and the event loop (one copy of each in memory instead of one per role).
    """
    parser = make_parser(prog, doc)
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="[ROLE=]SOCKET",
        help="override the configured socket: /path.sock or host:port; with several roles,"
        " ROLE=SOCKET for the role whose log name is ROLE (repeatable)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a stop waits for in-flight requests (default: %(default)s)",
    )
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        classes = list(roles_of(args))
    except ValueError as e:
        parser.error(str(e))
    log = setup_logging(prog, verbose=args.verbose)
    config = load_config_or_exit(args.config, prog)
    named = classes[0].name if len(classes) == 1 else None
    if config_roles is not None:
        classes += [cls for cls in config_roles(config, args) if cls not in classes]
    try:
        listen = listen_overrides(args.listen, [cls.name for cls in classes], named)
    except ValueError as e:
        parser.error(str(e))
    register_roles(cls.name for cls in classes)
    raise_fd_limit(log)
    from chatmaild.common import metrics

    metrics.configure(config.metrics_address, config.metrics_dir, prog)

    async def main() -> int:
        daemons = [cls(config, args) for cls in classes]
        endpoints = [listen[d.name] if d.name in listen else d.endpoint() for d in daemons]
        shared: dict[str, object] = {}
        for daemon, endpoint in zip(daemons, endpoints, strict=True):
            daemon.listen_endpoint = endpoint
            daemon.shared = shared
        try:
            inherited = inherited_for(endpoints, systemd_sockets())
        except OSError as e:
            log.error("cannot use the sockets passed by systemd (LISTEN_FDS): %s", e)
            return 1
        servers: list[Server] = []
        bound: list[BoundUnixSocket] = []
        try:
            for daemon, endpoint, passed in zip(daemons, endpoints, inherited, strict=True):
                try:
                    sock, socket_file = open_listener(endpoint, passed)
                except OSError as e:
                    daemon.log.error("cannot listen on %s: %s", endpoint, e)
                    return 1
                if socket_file is not None:
                    bound.append(socket_file)
                servers.append(Server(daemon, sock, stop_timeout=args.stop_timeout))
            await serve_until_signal(servers)
        finally:
            for server in servers:
                server.sock.close()
            for socket_file in bound:
                socket_file.remove()
        return 0

    _small_asyncio_reads()  # where uvloop is not used
    if all(cls.fast_loop for cls in classes):
        _use_fast_event_loop()
    return asyncio.run(main())


def run_async_main(coro_factory: Callable[[], Awaitable[int]]) -> int:
    """For tools (not socket daemons) that still want one asyncio main."""
    return asyncio.run(coro_factory())


# What one read of asyncio's own loop asks for: below glibc's threshold for mmap
# (128 KiB).  asyncio's 256 KiB costs an mmap and munmap per read (14 us against 2
# us for 200 bytes) until glibc raises that threshold, and then fragments the heap:
# each read's buffer, shrunk to what came, pins the top of the heap, and the web
# process grew by 0.3 KB per TLS handshake for good (issue 24).  A TLS record is at
# most 16 KiB, a UDP datagram 64 KiB.
ASYNCIO_READ_SIZE = 64 * 1024


def _small_asyncio_reads() -> None:
    from asyncio import selector_events

    transport = getattr(selector_events, "_SelectorTransport", None)
    if transport is not None and getattr(transport, "max_size", 0) > ASYNCIO_READ_SIZE:
        transport.max_size = ASYNCIO_READ_SIZE


def _use_fast_event_loop() -> None:
    """uvloop when installed (about twice asyncio's throughput); CHATMAILD_UVLOOP=0 opts out."""
    if os.environ.get("CHATMAILD_UVLOOP", "1") == "0":
        return
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
