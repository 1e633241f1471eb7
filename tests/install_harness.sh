#!/usr/bin/env bash
# Test harness for `make install` (run by tests/test_relay_install.py as root):
# inside a private mount namespace /etc, /usr/local, /home, /var and /run are
# overlays on $WORK, so the host stays untouched.  `make install` runs there;
# then, in a private network namespace as well (only lo, so binding the real
# ports 25/465/993 harms nobody), the installed daemons are started from their
# unit files' ExecStart/User lines, Postfix and Dovecot from the rendered
# production configs, and $CHECK (a Python script) talks to them.
set -euo pipefail
WORK=$1
CHECK=$2
SRC=$(cd "$(dirname "$0")/.." && pwd)

for d in etc usr/local home var run; do
    name=${d//\//_}
    mkdir -p "$WORK/$name/upper" "$WORK/$name/work"
    mount -t overlay overlay \
        -o "lowerdir=/$d,upperdir=$WORK/$name/upper,workdir=$WORK/$name/work" "/$d"
done

# In a booted container (scripts/debian13.sh) systemd runs: make install would ask it
# to start the units, for real ports on the shared network.  Here the harness starts
# the daemons itself (below), as on a host without systemd.
rm -rf /run/systemd/system

# vmail is in no postdrop group on a production host (an older install-deps.sh put
# this host's there): here only the units' SupplementaryGroups= may grant it
gpasswd -d vmail postdrop >/dev/null 2>&1 || true

cd "$SRC"
make install MAIL_DOMAIN=chat.example.org > "$WORK/install.out" 2>&1 || {
    cat "$WORK/install.out"; exit 1; }
make install > "$WORK/install2.out" 2>&1 || { echo "second install failed"; cat "$WORK/install2.out"; exit 1; }

# other test runs share this machine's two cores: registration must not be
# refused for load (the production default refuses above a 1-minute load of 5)
echo "max_load_1m = 1000" >> /etc/chatmail/chatmail.ini
# an operator's ini from when the filter path used loopback ports still starts
printf '%s\n' "filtermail_smtp_port = 10080" "postfix_reinject_port = 10025" \
    "filtermail_host = 127.0.0.1" >> /etc/chatmail/chatmail.ini

unshare -n bash -s "$WORK" "$CHECK" "$SRC" <<'NETNS'
set -euo pipefail
WORK=$1; CHECK=$2; SRC=$3
ip link set lo up
pids=()
cleanup() {
    dovecot stop >/dev/null 2>&1 || true
    postfix stop >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1.5
}
trap cleanup EXIT
# what systemd would do for each daemon unit: RuntimeDirectory=(Mode=), User= (with its
# groups) plus SupplementaryGroups=, UMask=, ExecStart=
for unit in "$SRC"/systemd/*.service; do
    grep -q '^Type=notify' "$unit" || continue
    exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
    user=$(sed -n 's/^User=//p' "$unit")
    groups=$(id -Gn "$user" | tr ' ' ',')
    supplementary=$(sed -n 's/^SupplementaryGroups=//p' "$unit")
    [ -z "$supplementary" ] || groups="$groups,${supplementary// /,}"
    rundir=$(sed -n 's/^RuntimeDirectory=//p' "$unit")
    rundir_mode=$(sed -n 's/^RuntimeDirectoryMode=//p' "$unit")
    if [ -n "$rundir" ]; then
        install -d -o "$user" -g "$user" -m "${rundir_mode:-0755}" "/run/$rundir"
    fi
    caps=()
    if grep -q '^AmbientCapabilities=CAP_NET_BIND_SERVICE' "$unit"; then
        caps=(--inh-caps +net_bind_service --ambient-caps +net_bind_service)
    fi
    unit_umask=$(sed -n 's/^UMask=//p' "$unit")
    shell_umask=$(umask)
    umask "${unit_umask:-0022}"
    # shellcheck disable=SC2086
    setpriv --reuid="$user" --regid="$user" --groups="$groups" "${caps[@]}" $exec_start \
        > "$WORK/$(basename "$unit" .service).log" 2>&1 &
    pids+=($!)
    umask "$shell_umask"
done
postfix start > "$WORK/postfix-start.log" 2>&1
dovecot > "$WORK/dovecot-start.log" 2>&1
/usr/local/lib/chatmaild/venv/bin/python "$CHECK"
# the filter path's sockets and Dovecot's delivery and user-list sockets refuse
# every other local user, and so does the sendmail command
probe='import errno, socket, sys
try:
    socket.socket(socket.AF_UNIX).connect(sys.argv[1])
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))'
nobody=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
for sock in /var/spool/postfix/filtermail/{outgoing,incoming,milter}.sock \
            /var/spool/postfix/public/reinject{,_incoming} /run/dovecot/auth-userdb; do
    got=$(cd / && "${nobody[@]}" /usr/bin/python3 -I -c "$probe" "$sock")
    [ "$got" = EACCES ] || { echo "nobody connecting to $sock: $got"; exit 1; }
done
# Dovecot's own LMTP listener (0666 by default) is not made at all
[ ! -e /run/dovecot/lmtp ] || { echo "/run/dovecot/lmtp exists"; exit 1; }
if printf 'From: x@chat.example\nSubject: forged\n\nhi\n' \
        | (cd / && "${nobody[@]}" /usr/sbin/sendmail -f x@chat.example y@chat.example) 2>/dev/null; then
    echo "nobody could submit mail with sendmail"; exit 1
fi
if (cd / && "${nobody[@]}" /usr/sbin/postqueue -p) >/dev/null 2>&1; then
    echo "nobody could list the mail queue"; exit 1
fi
echo "socket access ok"
NETNS

# uninstall removes our software and units, never mail or keys
make uninstall > "$WORK/uninstall.out" 2>&1
[ ! -e /usr/local/lib/chatmaild ] || { echo "uninstall left /usr/local/lib/chatmaild"; exit 1; }
[ ! -e /etc/systemd/system/doveauth.service ] || { echo "uninstall left units"; exit 1; }
ls /home/vmail/mail/chat.example.org/*/password > /dev/null || { echo "uninstall lost mail"; exit 1; }
[ -f /etc/dkimkeys/opendkim.private ] && [ -f /etc/chatmail/chatmail.ini ] || { echo "uninstall lost keys"; exit 1; }
echo "uninstall ok"
