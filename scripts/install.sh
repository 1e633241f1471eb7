#!/usr/bin/env bash
# make install: turn this Debian 12 or 13 host into a chatmail relay (run as root).
#
#   make install MAIL_DOMAIN=chat.example.org          first time
#   make install                                       later: re-render, restart
#   make install TLS_CERT=/path/fullchain.pem TLS_KEY=/path/key.pem
#
# Idempotent: keeps an existing /etc/chatmail/chatmail.ini, TLS and DKIM keys and
# all mail; renders Postfix/Dovecot configs from the same templates the tests
# use, installs the systemd units and timers, and prints the DNS records.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)

LIB=/usr/local/lib/chatmaild
VENV=$LIB/venv
INI=/etc/chatmail/chatmail.ini
TLS_DIR=/etc/chatmail/tls
UNIT_DIR=/etc/systemd/system
say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo make install)"

# 1. packages: the servers, Debian's python3 and chatmaild's libraries
# shellcheck source=scripts/packages.sh
. scripts/packages.sh
apt_install_missing "${RUNTIME_PACKAGES[@]}" || die "apt-get install failed"

# 2. the mail user
if ! id vmail >/dev/null 2>&1; then
    useradd --system --create-home --home-dir /home/vmail --shell /usr/sbin/nologin vmail
    say "created user vmail"
fi

# 3. the Python package in its own virtualenv
# on Debian's python3, seeing Debian's python3-* libraries: pip adds chatmaild alone
if [ -f "$VENV/pyvenv.cfg" ] && ! grep -qx "include-system-site-packages = true" "$VENV/pyvenv.cfg"; then
    rm -rf "$VENV"  # made by an older install from pip-installed libraries
fi
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
pip_log=$(mktemp)
if ! "$VENV/bin/pip" install -q --no-deps --upgrade "$SRC" >"$pip_log" 2>&1; then
    cat "$pip_log" >&2
    die "pip install failed"
fi
rm -f "$pip_log"
say "installed chatmaild into $VENV"
PY="$VENV/bin/python"
export CHATMAILD_SOURCE_ROOT="$SRC"  # templates come from this checkout

# 4. configuration (kept when present)
mkdir -p /etc/chatmail
if [ ! -f "$INI" ]; then
    [ -n "${MAIL_DOMAIN:-}" ] || die "no $INI yet: run 'make install MAIL_DOMAIN=your.domain'"
    {
        echo "[params]"
        echo "mail_domain = $MAIL_DOMAIN"
        if [ -n "${TLS_CERT:-}" ]; then echo "tls_external_cert_and_key = $TLS_CERT $TLS_KEY"; fi
    } > "$INI"
    say "wrote $INI"
fi
"$VENV/bin/chatmaild" --config "$INI" config >/dev/null || die "$INI is invalid (see above)"
DOMAIN=$("$PY" -c "from chatmaild.config import read_config; print(read_config('$INI').mail_domain)")
MAILBOXES=$("$PY" -c "from chatmaild.config import read_config; print(read_config('$INI').mailboxes_dir)")
EXTERNAL_TLS=$("$PY" -c "from chatmaild.config import read_config; print(read_config('$INI').tls_external_cert_and_key or '')")
# account names, password hashes and mail are vmail's alone (useradd makes the
# home 0755 under Debian's UMASK 022; an existing vmail user may have none)
mkdir -p /home/vmail
chown vmail:vmail /home/vmail
chmod 0700 /home/vmail
mkdir -p "$MAILBOXES"
chown vmail:vmail "$MAILBOXES"
chmod 0700 "$MAILBOXES"
# filtermail's sockets: only vmail (filtermail) and Postfix may enter their
# directory, and setgid gives every socket group postfix, so only Postfix connects
# (the filtermail units may write only below /var/spool/postfix/filtermail)
for key in filtermail_smtp_socket filtermail_smtp_socket_incoming filtermail_milter_socket; do
    dir=$(dirname "$("$VENV/bin/chatmaild" --config "$INI" config "$key" 2>/dev/null)")
    install -d -o vmail -g postfix -m 2750 "$dir"
    case "$dir" in
        /var/spool/postfix/filtermail) ;;
        *) say "warning: $key is in $dir: add ReadWritePaths=$dir to the filtermail units" ;;
    esac
done

# 5. TLS: the configured certificate, else a self-signed one (kept across runs)
if [ -z "$EXTERNAL_TLS" ] && [ ! -f "$TLS_DIR/cert.pem" ]; then
    mkdir -p "$TLS_DIR"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=${DOMAIN//[\[\]]/}" -addext "subjectAltName=DNS:${DOMAIN//[\[\]]/}" \
        -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" 2>/dev/null
    say "created a self-signed certificate in $TLS_DIR"
fi
if [ -f "$TLS_DIR/key.pem" ]; then
    chown root:vmail "$TLS_DIR/key.pem"  # the onboarding endpoint runs as vmail
    chmod 0640 "$TLS_DIR/key.pem"
fi

# 6. DKIM key (kept when present); prints its TXT record, which we show again below
DKIM_RECORD=$("$VENV/bin/chatmaild" --config "$INI" dkim-keygen)

# 7. the Dovecot no-delay shim, only for the Dovecot series it was written for
"$PY" - <<EOF || say "no-delay shim not installed; Dovecot announces new mail 0.5 s later"
from pathlib import Path
from chatmaild.relay.nodelay import build
print("install: no-delay shim", build(Path("$LIB")))
EOF

# 8. Postfix and Dovecot configuration from the templates
"$VENV/bin/chatmaild" --config "$INI" render --root / >/dev/null
postfix check || die "postfix check failed"
doveconf -n >/dev/null || die "doveconf rejects the rendered /etc/dovecot/dovecot.conf"
say "rendered /etc/postfix and /etc/dovecot"

# 9. systemd units, timers and drop-ins
UNITS=()
for f in systemd/*.service systemd/*.timer; do
    install -m 0644 "$f" "$UNIT_DIR/"
    UNITS+=("$(basename "$f")")
done
for d in systemd/*.service.d; do
    mkdir -p "$UNIT_DIR/$(basename "$d")"
    install -m 0644 "$d"/chatmail.conf "$UNIT_DIR/$(basename "$d")/chatmail.conf"
done
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    ENABLE=()
    for u in "${UNITS[@]}"; do
        case "$u" in
            chatmail-expire.service|chatmail-fsreport.service) ;;  # started by their timers
            *) ENABLE+=("$u") ;;
        esac
    done
    systemctl enable -q "${ENABLE[@]}"
    systemctl restart "${ENABLE[@]}" postfix dovecot
    say "enabled and (re)started: ${ENABLE[*]} postfix dovecot"
else
    say "systemd is not running here: units installed but not started"
fi

# 10. what to publish
bare=${DOMAIN//[\[\]]/}
cat <<EOF

DNS records to publish for $bare:
$bare. 3600 IN MX 10 $bare.
$bare. 3600 IN TXT "v=spf1 a ~all"
_dmarc.$bare. 3600 IN TXT "v=DMARC1;p=reject;adkim=s;aspf=s"
$DKIM_RECORD
_submission._tcp.$bare. 3600 IN SRV 0 1 587 $bare.
_submissions._tcp.$bare. 3600 IN SRV 0 1 465 $bare.
_imap._tcp.$bare. 3600 IN SRV 0 1 143 $bare.
_imaps._tcp.$bare. 3600 IN SRV 0 1 993 $bare.
EOF
