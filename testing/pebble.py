"""Debian's pebble (Let's Encrypt's test CA) for tests: a real ACME server on loopback.

Its directory is served over HTTPS with a certificate of a throwaway CA made
here (``directory_ca``: what an ACME client must trust to talk to it); the
certificates it issues chain to a root it makes at every start (``root_pem()``:
what a client of the relay must trust).  It validates HTTP-01 challenges on
``http_port`` of the address the names resolve to through ``dns`` (host:port).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from testing.processes import stop_group

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"
Wrap = Callable[[list[str]], list[str]]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held while picking (two picks one after
    the other may get the same port, and pebble's two listeners then clash)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Pebble:
    def __init__(
        self,
        workdir: Path,
        dns: str,
        http_port: int,
        validity_seconds: int | None = None,
        wrap: Wrap | None = None,
        port: int | None = None,
    ) -> None:
        """``wrap``: runs pebble elsewhere (a machine's network namespace), with ``port``."""
        self.wrap = wrap or (lambda argv: argv)
        self.in_netns = wrap is not None
        self.workdir = workdir
        self.dns = dns
        self.http_port = http_port
        self.validity_seconds = validity_seconds
        if port:
            self.port, self.management_port, self.tls_port = port, port + 1, port + 2
        else:
            self.port, self.management_port, self.tls_port = _free_ports(3)
        self.proc: subprocess.Popen | None = None
        self.directory_ca = workdir / "directory-ca.pem"
        self.log = workdir / "pebble.log"

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _make_directory_cert(self) -> tuple[Path, Path]:
        w = self.workdir
        if not (w / "wfe-cert.pem").exists():
            run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
            ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
            run("openssl", "req", "-x509", *ec, "-days", "2",
                "-subj", "/CN=pebble test directory CA",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout", str(w / "directory-ca.key"), "-out", str(self.directory_ca))  # fmt: skip
            run("openssl", "req", *ec, "-subj", "/CN=127.0.0.1",
                "-keyout", str(w / "wfe-key.pem"), "-out", str(w / "wfe.csr"))  # fmt: skip
            # what Python 3.13's default context (VERIFY_X509_STRICT) wants of a server
            (w / "wfe.ext").write_text(
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n"
            )
            run("openssl", "x509", "-req", "-in", str(w / "wfe.csr"), "-CA", str(self.directory_ca),
                "-CAkey", str(w / "directory-ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(w / "wfe.ext"), "-out", str(w / "wfe-cert.pem"))  # fmt: skip
        return w / "wfe-cert.pem", w / "wfe-key.pem"

    def start(self) -> Pebble:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cert, key = self._make_directory_cert()
        settings: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity_seconds:
            settings["certificateValidityPeriod"] = self.validity_seconds
        config = self.workdir / "pebble-config.json"
        config.write_text(json.dumps({"pebble": settings}, indent=1))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PEBBLE_VA_NOSLEEP": "1",  # answer at once, not after 0-15 s
            "PEBBLE_WFE_NONCEREJECT": "0",  # no random badNonce retries
            "PEBBLE_AUTHZREUSE": "0",  # every order validated again
        }
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.wrap([PEBBLE, "-config", str(config), "-dnsserver", self.dns]),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _fetch(self, url: str) -> bytes:
        """GET ``url`` from where pebble runs (its network namespace)."""
        if not self.in_netns:
            ctx = ssl.create_default_context(cafile=str(self.directory_ca))
            with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
                return r.read()
        code = (
            "import ssl, sys, urllib.request as u;"
            f"c = ssl.create_default_context(cafile={str(self.directory_ca)!r});"
            f"sys.stdout.buffer.write(u.urlopen({url!r}, context=c, timeout=5).read())"
        )
        res = subprocess.run(self.wrap(["python3", "-c", code]), capture_output=True, timeout=30)
        if res.returncode != 0:
            raise OSError(res.stderr.decode(errors="replace")[-500:])
        return res.stdout

    def _wait_ready(self, timeout: float = 30.0) -> None:
        until = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"pebble exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                self._fetch(self.directory)
                return
            except OSError:
                if time.monotonic() > until:
                    raise
                time.sleep(0.2)

    def root_pem(self) -> bytes:
        """The root every certificate pebble issues (since its start) chains to."""
        return self._fetch(f"https://127.0.0.1:{self.management_port}/roots/0")

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None

    def __enter__(self) -> Pebble:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MockDNS:
    """pebble-challtestsrv (from Debian's pebble) as the DNS server of a network
    namespace: every A query is answered with 127.0.0.1, AAAA with nothing."""

    def __init__(self, workdir: Path, wrap: Wrap, port: int = 8053) -> None:
        self.wrap, self.port, self.log = wrap, port, workdir / "challtestsrv.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> MockDNS:
        argv = [CHALLTESTSRV, "-dns01", self.address, "-http01", "", "-https01", "",
                "-tlsalpn01", "", "-management", f"127.0.0.1:{self.port + 2}",
                "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.wrap(argv), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        stop_group(self.proc)
