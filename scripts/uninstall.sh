#!/usr/bin/env bash
# make uninstall: apt-get remove chatmaild.  The relay stops (its daemons, Postfix and
# Dovecot); mail, accounts, /etc/chatmail (config, TLS), the DKIM key and the vmail
# user stay.  `apt-get purge chatmaild` also removes config and keys, never the mail.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "uninstall: run as root" >&2; exit 1; }
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q chatmaild
echo "uninstall: removed chatmaild; kept mail, /etc/chatmail, keys and the vmail user"
