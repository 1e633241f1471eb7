#!/usr/bin/env bash
# Install what the tests and the local relay need on Debian 12: apt packages,
# the vmail user, and a virtualenv (.venv) holding chatmaild and its test deps.
# Idempotent; a rerun with nothing to do takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    postfix dovecot-core dovecot-imapd dovecot-lmtpd
    libsystemd-dev pkg-config gcc python3-dev python3-venv
    openssl gnupg sq zstd dovecot-dev iproute2 util-linux procps
)

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
# filtermail re-injects through Postfix's public/ directory, which only the
# postdrop group may enter; the local relays start their daemons with vmail's
# groups (installed units add postdrop to the two filtermail services alone)
if [ "$(id -u)" = 0 ] && ! id -nG vmail | grep -qw postdrop; then
    usermod -a -G postdrop vmail
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.chatmaild-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
