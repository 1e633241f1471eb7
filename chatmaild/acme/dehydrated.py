"""Runs Debian's dehydrated (an ACME client in one bash script) for the relay's names.

Why dehydrated (README, "Certificates"): nothing of it runs between renewals,
it is packaged in Debian 12 and 13, answers HTTP-01 by writing a file (our web
process serves it on port 80), keeps one account per CA and its certificates
in one directory, and needs only bash, curl and openssl.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEHYDRATED = "dehydrated"
TIMEOUT = 600.0  # a CA that answers slowly still gets its time; the timer runs again


@dataclass(frozen=True)
class Paths:
    state: Path  # dehydrated's BASEDIR: accounts/, certs/, chains/
    challenges: Path  # WELLKNOWN, served on port 80

    @property
    def config_file(self) -> Path:
        return self.state / "dehydrated.conf"

    def issued(self, first_name: str) -> tuple[Path, Path]:
        """dehydrated's current fullchain and key of the certificate named ``first_name``."""
        d = self.state / "certs" / first_name
        return d / "fullchain.pem", d / "privkey.pem"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str  # why it failed: dehydrated's last ERROR, or the CA's detail
    output: str


def config_text(directory: str, paths: Paths, contact: str, ca_bundle: str | None) -> str:
    lines = {
        "CA": directory,
        "BASEDIR": str(paths.state),
        "WELLKNOWN": str(paths.challenges),
        "CHALLENGETYPE": "http-01",
        "KEY_ALGO": "prime256v1",  # the certificate's key: small, fast on a small board
        "KEYSIZE": "3072",  # the account key (dehydrated's accounts are RSA)
        "PRIVATE_KEY_RENEW": "yes",
        "RENEW_DAYS": "0",  # chatmail-acme decides when to renew (and then forces)
        "CONTACT_EMAIL": contact,
        "HOOK": "",
        "AUTO_CLEANUP": "yes",
    }
    if ca_bundle:
        lines["CURL_OPTS"] = f"--cacert {shlex.quote(ca_bundle)}"
    text = "# written by chatmail-acme on every run; edit chatmail.ini instead\n"
    return text + "".join(f"{k}={shlex.quote(v)}\n" for k, v in lines.items() if v or k == "HOOK")


_DETAIL = re.compile(r'"detail"\s*:\s*"((?:[^"\\]|\\.)*)"')


def failure_reason(output: str) -> str:
    """One line saying why dehydrated failed: the CA's problem detail when it sent one,
    else dehydrated's last ERROR line."""
    errors = [line.strip() for line in output.splitlines() if "ERROR" in line]
    if not errors:
        tail = [line.strip() for line in output.splitlines() if line.strip()]
        return tail[-1][:300] if tail else "dehydrated failed without a message"
    last = errors[-1]
    detail = _DETAIL.search(last) or _DETAIL.search(output)
    text = last.lstrip("+ ").removeprefix("ERROR: ")
    if detail:
        text = f"{text.split('(', 1)[0].strip()}: {detail.group(1)}"
    return re.sub(r"\s+", " ", text)[:300]


def obtain(
    directory: str,
    paths: Paths,
    names: tuple[str, ...],
    contact: str,
    *,
    ca_bundle: str | None = None,
    force: bool = False,
    timeout: float = TIMEOUT,
) -> Outcome:
    """Ask the CA for one certificate covering ``names`` (the first is its directory)."""
    # the web process (vmail) reads the answers: their way open, the rest private
    for d in (paths.challenges.parent, paths.challenges):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    paths.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = paths.config_file.with_suffix(".tmp")
    tmp.write_text(config_text(directory, paths, contact, ca_bundle))
    tmp.replace(paths.config_file)
    cmd = [DEHYDRATED, "--cron", "--accept-terms", "--config", str(paths.config_file)]
    for name in names:
        cmd += ["--domain", name]
    if force:
        cmd.append("--force")
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            cwd=paths.state, env=_environment(),
        )  # fmt: skip
    except FileNotFoundError:
        return Outcome(False, f"{DEHYDRATED} is not installed", "")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") + (e.stderr or "") if isinstance(e.stdout, str) else ""
        return Outcome(False, f"no answer from the CA within {timeout:.0f} s", out)
    output = res.stdout + res.stderr
    if res.returncode != 0:
        return Outcome(False, failure_reason(output), output)
    return Outcome(True, "", output)


def _environment() -> dict[str, str]:
    # the umask makes the keys dehydrated writes private; the answers are made readable
    # for the web process by their directory's mode and dehydrated's own 0644 files
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep} | {"HOME": "/nonexistent"}
