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

# shellcheck disable=SC1091
. /etc/os-release
APT_PACKAGES=(
    postfix dovecot-core dovecot-imapd dovecot-lmtpd
    python3 python3-venv
    # chatmaild's runtime dependencies, as the Debian package will depend on them
    python3-aiohttp python3-aiosmtpd python3-cryptography python3-dkim python3-dnspython
    python3-filelock python3-systemd python3-uvloop
    # the no-delay IDLE shim is compiled against the installed Dovecot
    gcc dovecot-dev
    openssl gnupg sq zstd iproute2 util-linux procps
)
case "${VERSION_CODENAME:-}" in
    bookworm) ;;
    # Python 3.13 has no crypt module; Dovecot 2.4 creates accounts through Lua
    *) APT_PACKAGES+=(python3-crypt-r dovecot-auth-lua) ;;
esac

need_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: need root to apt-get install: ${need_apt[*]}" >&2
        exit 1
    fi
    echo "install-deps: apt-get install ${need_apt[*]}"
    # no default Postfix instance: every relay here runs its own config directory
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
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
