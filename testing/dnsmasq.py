"""Debian's dnsmasq (dnsmasq-base: no service of its own) as an authoritative DNS
server on loopback, serving the records of ``chatmaild.relay.dnsrecords``.

``Zone(records).start(port)`` runs ``dnsmasq --no-daemon`` with one option per
record (A via --host-record, MX, TXT, SRV, CNAME, CAA via --dns-rr) and
``--local`` for the domain, so names it does not know get NXDOMAIN.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import time

from chatmaild.relay.dnsrecords import Record
from testing.processes import stop_group

DNSMASQ = "/usr/sbin/dnsmasq"


def _caa_hex(value: str) -> str:
    flags, tag, text = value.split(" ", 2)
    tag_bytes, text_bytes = tag.encode(), text.strip('"').encode()
    return (bytes([int(flags), len(tag_bytes)]) + tag_bytes + text_bytes).hex()


def options(records: list[Record], address: str = "127.0.0.1") -> list[str]:
    out = []
    for r in records:
        if r.rtype == "A":
            out.append(f"--host-record={r.name},{address}")
        elif r.rtype == "MX":
            pref, target = r.value.split()
            out.append(f"--mx-host={r.name},{target.rstrip('.')},{pref}")
        elif r.rtype == "TXT":
            out.append(f"--txt-record={r.name}," + ",".join(shlex.split(r.value)))
        elif r.rtype == "SRV":
            priority, weight, port, target = r.value.split()
            out.append(f"--srv-host={r.name},{target.rstrip('.')},{port},{priority},{weight}")
        elif r.rtype == "CNAME":
            out.append(f"--cname={r.name},{r.value.rstrip('.')}")
        elif r.rtype == "CAA":
            out.append(f"--dns-rr={r.name},257,{_caa_hex(r.value)}")
        else:
            raise ValueError(f"no dnsmasq option for {r.rtype}")
    return out


def free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1: dnsmasq listens on both."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


class PortTaken(RuntimeError):
    pass


class Zone:
    def __init__(self, domain: str, records: list[Record]) -> None:
        self.domain, self.records = domain, records
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Zone:
        # Another test may take the port between our pick and dnsmasq's bind: pick again.
        for _ in range(5):
            try:
                return self._start()
            except PortTaken:
                self.port = free_port()
        return self._start()

    def _start(self) -> Zone:
        argv = [DNSMASQ, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--no-poll", "--pid-file=", "--user=nobody", "--group=nogroup",
                "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={self.port}",
                f"--local=/{self.domain}/", *options(self.records)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        import dns.message
        import dns.query

        until = time.monotonic() + timeout
        query = dns.message.make_query(self.domain, "MX")
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                if "Address already in use" in out:
                    raise PortTaken(out)
                raise RuntimeError(f"dnsmasq exited: {out}")
            try:
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
                return
            except Exception:  # noqa: BLE001 (not listening yet)
                if time.monotonic() > until:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None

    def __enter__(self) -> Zone:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
