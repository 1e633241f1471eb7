#!/usr/bin/env bash
# Install what the tests and the local relay need on Debian 12 or 13: apt packages
# (the servers AND chatmaild's runtime libraries: operators run Debian's python3-*),
# the vmail user, and a virtualenv ($VENV, default .venv) on Debian's /usr/bin/python3
# that sees those libraries and adds only chatmaild (editable) and the test tools.
# Idempotent; a rerun with nothing to do takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
# the interpreter operators run; not whatever python3 is first on PATH
PYTHON=/usr/bin/python3

# shellcheck source=scripts/packages.sh
. scripts/packages.sh
had_prometheus=$(dpkg-query -W -f='${Status}' prometheus 2>/dev/null || true)
apt_install_missing "${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}"
# the tests start their own Prometheus: the service the package just started goes
if [[ $had_prometheus != *"ok installed"* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi

if [ "$(id -u)" = 0 ] && ! id vmail >/dev/null 2>&1; then
    useradd --system --home-dir /home/vmail --shell /usr/sbin/nologin vmail
fi

# a venv made from another interpreter, or without Debian's libraries, is made anew
if [ -f "$VENV/pyvenv.cfg" ] && ! { grep -qx "home = $(dirname "$PYTHON")" "$VENV/pyvenv.cfg" &&
    grep -qx "include-system-site-packages = true" "$VENV/pyvenv.cfg"; }; then
    echo "install-deps: $VENV is not a $PYTHON venv with system site packages; recreating it"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
stamp=$VENV/.chatmaild-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    # runtime requirements must be met by Debian's packages: pip installs none of them
    "$VENV/bin/pip" install -q --no-deps -e .
    "$VENV/bin/python" scripts/requirements.py test | xargs "$VENV/bin/pip" install -q
    "$VENV/bin/python" scripts/requirements.py check
    touch "$stamp"
fi
