"""A copy of chatmaild that the vmail user can run, wherever the checkout lives.

The daemons of a local relay run as vmail (like their systemd units), and
Dovecot runs the quota-warning program as vmail too.  A checkout below a
private directory (root's clone in /root, mode 0700) is out of their reach,
and so is its virtualenv.  :func:`stage` copies the runtime package (no test
helpers) into a world-readable directory and writes one launcher per console
script there; the launchers run Debian's ``/usr/bin/python3`` with Debian's
``python3-*`` libraries, exactly what the Debian package runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

from chatmaild.relay.render import SOURCE_ROOT

# the interpreter operators run (and the venv's base: see scripts/install-deps.sh)
SYSTEM_PYTHON = "/usr/bin/python3"
RUNTIME_PACKAGE = "chatmaild"
NOT_STAGED = ("__pycache__",)


def console_scripts(source_root: Path = SOURCE_ROOT) -> dict[str, str]:
    """Script name -> module, from pyproject.toml's [project.scripts]."""
    with open(source_root / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    return {name: target.partition(":")[0] for name, target in scripts.items()}


def _launcher(lib: Path, module: str) -> str:
    # -s: no user site; -P: no script/cwd directory on sys.path (cwd may be writable by vmail)
    return (
        "#!/bin/sh\n"
        "# chatmaild from a staged copy, on Debian's python3 and its python3-* libraries\n"
        f'PYTHONPATH={lib} exec {SYSTEM_PYTHON} -s -P -m {module} "$@"\n'
    )


def stage(dest: Path, source_root: Path = SOURCE_ROOT) -> Path:
    """Copy the runtime package to ``dest/lib``, launchers to ``dest/bin``; return ``dest/bin``.

    Everything is root-owned and world-readable, so vmail can run it but not change
    it.  Rewritten on every call: a restarted relay runs the checkout's current code.
    """
    lib, bin_dir = dest / "lib", dest / "bin"
    for d in (dest, lib, bin_dir):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
    # copy next to the old tree, then swap: a daemon starting meanwhile sees one or the other
    fresh = lib / f".{RUNTIME_PACKAGE}.new"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(
        source_root / RUNTIME_PACKAGE, fresh, ignore=shutil.ignore_patterns(*NOT_STAGED)
    )
    # vmail cannot write byte code next to root's files: compile it now, once
    subprocess.run(
        [SYSTEM_PYTHON, "-m", "compileall", "-q", "-j", "0", str(fresh)],
        check=True,
        stdin=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    for path in (fresh, *fresh.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    old = lib / f".{RUNTIME_PACKAGE}.old"
    shutil.rmtree(old, ignore_errors=True)
    current = lib / RUNTIME_PACKAGE
    if current.exists():
        os.replace(current, old)
    os.replace(fresh, current)
    shutil.rmtree(old, ignore_errors=True)
    programs = {**console_scripts(source_root), "python3": ""}
    for name, module in programs.items():
        script = bin_dir / name
        tmp = bin_dir / f".{name}.tmp"
        if module:
            tmp.write_text(_launcher(lib, module), encoding="utf-8")
        else:
            # the plain interpreter with the staged package importable (tests run modules as vmail)
            tmp.write_text(
                f'#!/bin/sh\nPYTHONPATH={lib} exec {SYSTEM_PYTHON} -s -P "$@"\n', encoding="utf-8"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, script)
    return bin_dir
