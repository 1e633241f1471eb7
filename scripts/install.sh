#!/usr/bin/env bash
# make install: turn this Debian 12 or 13 host into a chatmail relay (run as root) by
# building the Debian package for this release from this checkout (make deb) and
# installing it with apt: the same install path as `apt install ./chatmaild_*.deb`.
#
#   make install MAIL_DOMAIN=chat.example.org          first time
#   make install                                       later: the checkout's code again
#   make install MAIL_DOMAIN=... TLS_CERT=/path/fullchain.pem TLS_KEY=/path/key.pem
#
# An existing /etc/chatmail/chatmail.ini is kept (the package configures from it);
# keys, certificates and mail always are.  See debian/README.Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

INI=/etc/chatmail/chatmail.ini
DIST=${DIST:-dist}
say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo make install)"

# what `make install` did before there was a package: a virtualenv in /usr/local and
# unit files in /etc/systemd/system, which would hide the package's units
LEGACY=/usr/local/lib/chatmaild
if [ -d "$LEGACY" ]; then
    for unit in systemd/*.service systemd/*.timer; do
        name=$(basename "$unit")
        if [ -f "/etc/systemd/system/$name" ] && grep -q "$LEGACY" "/etc/systemd/system/$name"; then
            if [ -d /run/systemd/system ]; then systemctl disable -q --now "$name" || true; fi
            rm -f "/etc/systemd/system/$name"
        fi
    done
    for d in /etc/systemd/system/dovecot.service.d /etc/systemd/system/postfix@-.service.d; do
        rm -f "$d/chatmail.conf"  # the package ships its own (conffiles)
    done
    rm -rf "$LEGACY"
    say "removed the virtualenv install in $LEGACY and its units"
fi

if [ ! -f "$INI" ]; then
    [ -n "${MAIL_DOMAIN:-}" ] || die "no $INI yet: run 'make install MAIL_DOMAIN=your.domain'"
    mkdir -p /etc/chatmail
    {
        echo "# chatmail relay configuration: every key is in chatmail.ini(5);"
        echo "# after a change run \"chatmaild setup\" (or dpkg-reconfigure chatmaild)"
        echo "[params]"
        echo "mail_domain = $MAIL_DOMAIN"
        if [ -n "${TLS_CERT:-}" ]; then echo "tls_external_cert_and_key = $TLS_CERT $TLS_KEY"; fi
    } >"$INI"
    say "wrote $INI"
elif [ -n "${MAIL_DOMAIN:-}" ] && ! grep -Eq "^[[:space:]]*mail_domain[[:space:]]*=[[:space:]]*$MAIL_DOMAIN[[:space:]]*$" "$INI"; then
    die "$INI names another mail_domain; edit it and run 'chatmaild setup', or dpkg-reconfigure chatmaild"
fi

DIST=$DIST ./scripts/build-deb.sh
version=$(dpkg-parsechangelog -S Version)
deb=$(realpath "$DIST/chatmaild_${version}_all.deb")
# --reinstall: the checkout's code even when the version number is the same
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall "$deb"
say "installed $deb"
