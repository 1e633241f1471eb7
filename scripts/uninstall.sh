#!/usr/bin/env bash
# make uninstall: stop and remove chatmaild's units, drop-ins and virtualenv.
# Mail, accounts, /etc/chatmail (config, TLS and DKIM keys) and the vmail user
# stay; the rendered /etc/postfix and /etc/dovecot stay too (Postfix and
# Dovecot are stopped, since without our daemons they cannot work).
set -euo pipefail
cd "$(dirname "$0")/.."

LIB=/usr/local/lib/chatmaild
UNIT_DIR=/etc/systemd/system
say() { printf 'uninstall: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "uninstall: run as root" >&2; exit 1; }

UNITS=()
for f in systemd/*.service systemd/*.timer; do
    UNITS+=("$(basename "$f")")
done
if [ -d /run/systemd/system ]; then
    systemctl disable -q --now "${UNITS[@]}" 2>/dev/null || true
    systemctl stop postfix dovecot 2>/dev/null || true
fi
for u in "${UNITS[@]}"; do
    rm -f "$UNIT_DIR/$u"
done
for d in systemd/*.service.d; do
    rm -f "$UNIT_DIR/$(basename "$d")/chatmail.conf"
    rmdir "$UNIT_DIR/$(basename "$d")" 2>/dev/null || true
done
[ -d /run/systemd/system ] && systemctl daemon-reload
rm -rf "$LIB"
say "removed units and $LIB; kept mail, /etc/chatmail and the vmail user"
