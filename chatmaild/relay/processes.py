"""The processes of a local relay: started, supervised (restarted with back-off, like
``Restart=always``), found again (the servers' masters and everything they forked)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from chatmaild.expire.maildir import remove_stale_uidlist_locks

log = logging.getLogger("chatmaild.relay")

STOP_TIMEOUT = 15.0
# restart back-off of supervised processes: first delay, doubling up to the cap;
# a process that ran this long before dying starts again from the first delay
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
RESTART_RESET_AFTER = 60.0
SERVERS = ("postfix", "dovecot")
# how long a restarted server may take to listen before its deferred mail is flushed
FLUSH_WAIT = 60.0
# the dict roles run in one process, "dict" (chatmail-dict.service)
DICT_ROLES = ("doveauth", "lastlogin", "metadata")


class RelayError(RuntimeError):
    """The relay could not start; the message includes the relevant log tail."""


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


def title(pid: int) -> str:
    """A process's command line, for the log ("?" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()[:120] or "?"  # fmt: skip
    except OSError:
        return "?"


def _wait_gone(pids: set[int], timeout: float) -> None:
    """Wait until ``pids`` are gone; SIGKILL whatever is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if _alive(p)}
        time.sleep(0.02)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def open_log(path: Path):
    """``path`` opened for appending, root's alone (0600, also if it existed): the
    logs name every account, and Postfix's mail_owner may enter their directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# the web role's nice value (its unit: Nice=10): when the CPU is short, mail comes first
WEB_NICE = 10


def _lower_session_priority(pid: int, nice: int) -> None:
    """Lower the CPU share of process ``pid``'s session against the other sessions.

    Each daemon runs in a session of its own, and the kernel shares the CPU between
    sessions (autogroups) before a process's nice value counts, so ``nice`` alone
    would give the web port the same share as all of Postfix.  Under systemd the
    unit's cgroup (CPUWeight=) does this instead.
    """
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
    except OSError:
        pass  # a kernel without autogroups: nice alone is what applies


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} missing)"
    return f"--- {path} (last {lines} lines)\n" + "\n".join(text[-lines:])


class Supervision:
    """Spawning, supervising and finding the relay's processes (part of ``Relay``)."""

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
        with open_log(logfile) as out:
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
        if name == "newemail":
            _lower_session_priority(proc.pid, WEB_NICE)
        with self._lock:
            self._procs[name] = proc
            self._started_at[name] = time.monotonic()
        # recorded so that a later start can end what a killed run left behind
        (self.run_dir / f"{name}.relay-pid").write_text(f"{proc.pid}\n")
        return proc

    def _log_of(self, name: str) -> str:
        if name in SERVERS:
            return (
                _tail(self.log_dir / f"{name}-start.out")
                + "\n"
                + _tail(self.log_dir / f"{name}.log")
            )
        return _tail(self.log_dir / f"{name}.log")

    def _supervise(self) -> None:
        """Restart what dies, with back-off (the units' Restart=always), until stop()."""
        delay = {name: RESTART_DELAY for name in self._procs}
        due: dict[str, float] = {}

        def start_later(name: str, now: float) -> None:
            due[name] = now + delay[name]
            delay[name] = min(delay[name] * 2, RESTART_DELAY_MAX)

        while not self._stopping.wait(0.1):
            now = time.monotonic()
            with self._lock:
                procs = dict(self._procs)
            for name, proc in procs.items():
                if name in due:
                    if now >= due[name] and not self._stopping.is_set():
                        del due[name]
                        if not self._restart(name):  # as a failed ExecStartPre=: again later
                            start_later(name, now)
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
                start_later(name, now)

    def _restart(self, name: str) -> bool:
        """Start ``name`` again; False (logged) if that failed: the supervisor
        tries again after the back-off, it never stops supervising the others."""
        try:
            proc = self._start_again(name)
        except Exception as e:  # noqa: BLE001 - any failure: retried, never fatal
            log.error("relay %s: cannot restart %s: %s", self.mail_domain, name, e)
            return False
        self.restarts[name] = self.restarts.get(name, 0) + 1
        log.warning("relay %s: restarted %s (pid %d)", self.mail_domain, name, proc.pid)
        if (socket_path := self._delivery_socket(name)) and "postfix" in self.components:
            threading.Thread(target=self._flush_when_listening, args=(socket_path,),
                             name=f"relay-flush-{name}", daemon=True).start()  # fmt: skip
        return True

    def _start_again(self, name: str) -> subprocess.Popen:
        if name in SERVERS:
            # what the dead master left (children finishing, a stale lock) must go first
            self._end_server_leftovers(name)
        if name == "dovecot":
            # no Dovecot process is left: a uidlist lock without a PID is a killed
            # writer's, which Dovecot itself would wait two minutes for
            removed = remove_stale_uidlist_locks(self.config.mailboxes_dir, min_age=0)
            if removed:
                log.warning("relay %s: removed %d stale dovecot-uidlist.lock file(s)",
                            self.mail_domain, len(removed))  # fmt: skip
        return self.spawn(name)

    def _delivery_socket(self, name: str) -> str | None:
        """The socket Postfix delivers into that ``name`` serves, if any."""
        if name == "dovecot":
            return str(self.ports["lmtp"])
        if name == "filtermail":
            return str(self.config.filtermail_transport_socket)
        return None

    def _flush_when_listening(self, socket_path: str) -> None:
        """Mail that came while ``socket_path`` was gone waits deferred, its
        destination suspended: once it listens again, deliver it now rather than
        at Postfix's next retry (the units' ExecStartPost=postqueue -f)."""
        from chatmaild.relay.ports import _listening  # ports imports this module

        deadline = time.monotonic() + FLUSH_WAIT
        while socket_path not in _listening()[1]:
            if time.monotonic() > deadline or self._stopping.wait(0.05):
                return
        flush = ["postqueue", "-c", str(self.layout.postfix_config_dir), "-f"]
        try:
            res = subprocess.run(flush, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("relay %s: postqueue -f: %s", self.mail_domain, e)
            return
        if res.returncode:
            log.warning("relay %s: postqueue -f: %s", self.mail_domain, res.stderr.strip()[:200])

    def _end_server_leftovers(self, name: str) -> None:
        pid = self._postfix_pid() if name == "postfix" else self._dovecot_pid()
        if pid is not None:
            doomed = process_tree(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait_gone(doomed, STOP_TIMEOUT)

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
