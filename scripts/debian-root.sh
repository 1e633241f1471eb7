#!/usr/bin/env bash
# Run a command inside a booted Debian system of the given release (bookworm = 12,
# trixie = 13): that release's own systemd, Postfix, Dovecot and /usr/bin/python3,
# with this checkout bind-mounted at the same path.  Needs root on a Debian host.
#
#   scripts/debian-root.sh trixie run make test VENV=/var/lib/chatmaild-test/venv
#   scripts/debian-root.sh trixie run make run STATE=/tmp/relay13   # Ctrl-C stops it
#   scripts/debian-root.sh trixie shell                # interactive shell inside
#   scripts/debian-root.sh trixie build                # (re)build the cached root now
#   scripts/debian-root.sh --bare bookworm boot        # boot; print the PID of its
#                                                      # systemd; run until SIGTERM
#
# Options (before the release):
#   --bare              a fresh minimal machine instead of the test system: booted
#                       systemd and nothing of the relay installed, but every Debian
#                       package the chatmaild .deb needs is in apt's cache (with
#                       apt's lists), so `apt-get install ./chatmaild_*.deb` works
#                       without any network; Postfix and Dovecot are not masked
#   --private-network   the container gets its own network namespace (only lo):
#                       its ports 25, 443, 993 ... never meet the host's
#   --bind-ro=SRC[:DST] bind-mount a host directory read-only (repeatable)
#   --bind=SRC[:DST]    bind-mount a host directory writable (repeatable), e.g. a
#                       filesystem the container cannot make itself (no loop devices)
# Without --private-network the host's network (loopback) is shared.
# scripts/debian13.sh is `debian-root.sh trixie`.
#
# The root filesystem is made with `debootstrap --variant=minbase` from the
# mirror the host's apt uses, plus the packages below installed (or, --bare,
# downloaded) with apt, and cached as $CACHE/<name>-rootfs.tar.zst (name: the
# release, "-bare" added); it is rebuilt when older than 7 days, when the package
# list or mirror changes, or with CHATMAILD_ROOT_REFRESH=1.
# The tarball is unpacked once into $CACHE/<name>-root, which every run boots
# read-only under a tmpfs overlay (`systemd-nspawn -b --volatile=overlay`:
# systemd is PID 1 inside, every run starts from the same pristine system and
# leaves nothing in it).  The command runs via nsenter in the container's
# namespaces; then the container is powered off: on success, failure, Ctrl-C or
# SIGTERM alike (and, via PDEATHSIG, even when this script is killed).  The
# command's exit status is the script's.  Runs may overlap (they share the
# venv below); a rebuild waits until no container runs.
#
# Kept between runs (host paths; not for --bare):
#   $CACHE/<name>-state   mounted at /var/lib/chatmaild-test (the test venv);
#                         emptied whenever the root filesystem is rebuilt
#   $CACHE/<name>-pip     pip's download cache (/root/.cache/pip inside)
#
# Environment: CHATMAILD_ROOT_CACHE (default /var/cache/chatmaild),
# CHATMAILD_DEBIAN_MIRROR (default: the host's apt mirror),
# CHATMAILD_ROOT_REFRESH=1 (rebuild now).  The names CHATMAILD_TRIXIE_CACHE and
# CHATMAILD_TRIXIE_REFRESH of the former debian13.sh still work.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
BARE=0
PRIVATE_NETWORK=0
EXTRA_BINDS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bare) BARE=1 ;;
        --private-network) PRIVATE_NETWORK=1 ;;
        --bind-ro=*) EXTRA_BINDS+=("--bind-ro=${1#--bind-ro=}") ;;
        --bind=*) EXTRA_BINDS+=("--bind=${1#--bind=}") ;;
        -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) printf 'debian-root: unknown option %s\n' "$1" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done
SUITE=${1:-}
case "$SUITE" in
    bookworm | trixie) shift ;;
    *) printf 'debian-root: first argument: bookworm or trixie, not "%s"\n' "$SUITE" >&2; exit 2 ;;
esac
NAME=$SUITE
BARE_KEY=0
if [ "$BARE" = 1 ]; then NAME=$SUITE-bare; BARE_KEY=1:2; fi
CACHE=${CHATMAILD_ROOT_CACHE:-${CHATMAILD_TRIXIE_CACHE:-/var/cache/chatmaild}}
REFRESH=${CHATMAILD_ROOT_REFRESH:-${CHATMAILD_TRIXIE_REFRESH:-0}}
PIP_CACHE=$CACHE/$NAME-pip
MAX_AGE_DAYS=7
BOOT_TIMEOUT=90
STOP_TIMEOUT=30
# bump when the build steps below change in a way the package list does not show
BUILD_VERSION=3

# debootstrap --include: what a booted minimal system needs
BOOT_PACKAGES=(systemd systemd-sysv dbus ca-certificates)
# Then, from trixie itself, what the relay and the suite use: RUNTIME_PACKAGES and
# TEST_PACKAGES of scripts/packages.sh, read inside the new system (its own
# /etc/os-release picks the Debian 13 additions), and these:
EXTRA_PACKAGES=()  # none needed now
# units that would wake up during a test, and (test system only) listen on the
# shared host network
MASKED_UNITS=(
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer
    fstrim.timer systemd-tmpfiles-clean.timer
)
[ "$BARE" = 1 ] || MASKED_UNITS+=(postfix.service postfix@-.service dovecot.service dovecot.socket)

say() { printf 'debian-root(%s): %s\n' "$NAME" "$*" >&2; }
die() { printf 'debian-root(%s): %s\n' "$NAME" "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
    exit "${1:-2}"
}

# ---------------------------------------------------------------- host side

need_host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v zstd >/dev/null || missing+=(zstd)
    if [ ${#missing[@]} -gt 0 ]; then
        say "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# The first non-security Debian mirror of the host's apt sources (deb822 or one-line).
host_mirror() {
    local uri=""
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        uri=$(awk '
            BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; suites = ""; enabled = 1
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/) { suites = $i }
                    if ($i ~ /^Enabled:[ \t]*no/) { enabled = 0 }
                }
                if (enabled && uris != "" && suites !~ /-security/) { split(uris, u, " "); print u[1]; exit }
            }' /etc/apt/sources.list.d/*.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /-security/ {
                for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; exit } }' \
            /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# The security archive next to MIRROR (.../debian -> .../debian-security).
security_mirror() {
    case "$1" in
        */debian | */debian/) echo "${1%/}-security" ;;
        *) echo "http://deb.debian.org/debian-security" ;;
    esac
}

MIRROR=${CHATMAILD_DEBIAN_MIRROR:-$(host_mirror)}
SECURITY_MIRROR=$(security_mirror "$MIRROR")

cache_key() {
    {
        # (bare 1:2: make install's build dependencies are downloaded too)
        printf '%s\n' "$BUILD_VERSION" "$SUITE" "$BARE_KEY" "$MIRROR" "$SECURITY_MIRROR" \
            "${BOOT_PACKAGES[*]}" "${EXTRA_PACKAGES[*]}" "${MASKED_UNITS[*]}"
        cat "$SRC/scripts/packages.sh"
    } | sha256sum | cut -c1-16
}

# Each variant (package lists, mirror, build steps) has its own files, so that
# checkouts of different branches do not rebuild each other's roots in turn.
VARIANT=$NAME-$(cache_key)
TARBALL=$CACHE/$VARIANT-rootfs.tar.zst
KEY_FILE=$CACHE/$VARIANT-rootfs.key
STATE=$CACHE/$VARIANT-state
ROOT=$CACHE/$VARIANT-root

# Variants of this name not rebuilt for MAX_AGE_DAYS (a run would rebuild them first).
prune_old_variants() {
    local tarball variant
    for tarball in "$CACHE/$NAME"-*-rootfs.tar.zst; do
        [ -f "$tarball" ] && [ "$tarball" != "$TARBALL" ] || continue
        [ -n "$(find "$tarball" -mtime +$((MAX_AGE_DAYS - 1)) -print)" ] || continue
        variant=${tarball%-rootfs.tar.zst}
        [ "${variant#"$CACHE/$NAME"-}" != "${variant#"$CACHE/$NAME"-*-}" ] && continue  # other name
        rm -rf --one-file-system "$tarball" "$variant-rootfs.key" "$variant-root" \
            "$variant-root.id" "$variant-state"
    done
}

cache_is_fresh() {
    [ -f "$TARBALL" ] && [ -f "$KEY_FILE" ] || return 1
    [ "$(cat "$KEY_FILE")" = "$(cache_key)" ] || return 1
    [ -z "$(find "$TARBALL" -mtime +$((MAX_AGE_DAYS - 1)) -print)" ]
}

# Containers run with --register=no --keep-unit: no systemd-machined or host
# systemd needed (this host may have neither).
NSPAWN_COMMON=(systemd-nspawn --quiet --register=no --keep-unit --private-users=no)

build_rootfs() {
    local build root t0 t
    # (under the build lock) what a killed build left behind
    for build in "$CACHE"/build-"$NAME".*; do [ -d "$build" ] && rm -rf --one-file-system "$build"; done
    build=$(mktemp -d "$CACHE/build-$NAME.XXXXXX")
    root=$build/root
    say "building the $SUITE root filesystem from $MIRROR"
    t0=$(now)
    if ! debootstrap --variant=minbase --include="$(IFS=,; echo "${BOOT_PACKAGES[*]}")" \
        "$SUITE" "$root" "$MIRROR" >"$build/debootstrap.log" 2>&1; then
        tail -20 "$build/debootstrap.log" >&2
        die "debootstrap failed"
    fi
    say "debootstrap: $(since "$t0") s"

    t=$(now)
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # packages must not start services while they are installed
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    if [ "$BARE" = 1 ]; then
        # nothing installed: what `apt-get install ./chatmaild_*.deb` needs is downloaded
        # (the package's dependencies and recommends), and what `make install` needs to
        # build it; apt's lists kept
        # shellcheck disable=SC2016
        inside='. /tmp/chatmaild-scripts/packages.sh
            apt-get update -qq
            apt-get install -y -qq --download-only "${RUNTIME_PACKAGES[@]}" \
                "${DEB_EXTRA_PACKAGES[@]}" "${BUILD_PACKAGES[@]}" make'
    else
        # shellcheck disable=SC2016
        inside='. /tmp/chatmaild-scripts/packages.sh
            # no default Postfix instance: every relay renders its own configuration
            echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends \
                "${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}" "${BUILD_PACKAGES[@]}" "$@"
            apt-get clean'
    fi
    if ! "${NSPAWN_COMMON[@]}" -D "$root" --resolv-conf=copy-host \
        --bind-ro="$SRC/scripts:/tmp/chatmaild-scripts" \
        -E DEBIAN_FRONTEND=noninteractive -E LANG=C.UTF-8 \
        /bin/bash -ec "$inside" bash "${EXTRA_PACKAGES[@]}" </dev/null >"$build/apt.log" 2>&1; then
        tail -30 "$build/apt.log" >&2
        die "installing packages in the $SUITE root failed"
    fi
    rm -f "$root/usr/sbin/policy-rc.d"
    for unit in "${MASKED_UNITS[@]}"; do
        ln -sf /dev/null "$root/etc/systemd/system/$unit"
    done
    # a fresh machine id per boot (systemd makes a transient one for an empty file)
    : >"$root/etc/machine-id"
    say "packages: $(since "$t") s"

    t=$(now)
    tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' --acls -cf - . \
        | zstd -q -T0 -3 -o "$TARBALL.tmp"
    mv -f "$TARBALL.tmp" "$TARBALL"
    cache_key >"$KEY_FILE"
    prune_old_variants
    say "cached $(du -h "$TARBALL" | cut -f1) in $TARBALL: $(since "$t") s"
    say "built in $(since "$t0") s"
    rm -rf --one-file-system "$build"
}

ensure_rootfs() {
    if [ "$REFRESH" = 1 ] || ! cache_is_fresh; then
        build_rootfs
    fi
}

# ---------------------------------------------------------------- one run

# The tarball unpacked once; containers boot it read-only under a tmpfs overlay
# (--volatile=overlay), so every run starts from the same pristine system and
# nothing needs restoring or removing per run.
rootfs_id() { echo "$(cat "$KEY_FILE")@$(stat -c %Y "$TARBALL")"; }

unpacked_is_current() {
    [ -d "$ROOT" ] && [ "$(cat "$ROOT.id" 2>/dev/null)" = "$(rootfs_id)" ]
}

ensure_unpacked() {
    local t
    unpacked_is_current && return 0
    t=$(now)
    rm -rf --one-file-system "$ROOT" "$ROOT.new" "$ROOT.id"
    mkdir "$ROOT.new"
    zstd -q -d -T0 -c "$TARBALL" | tar -C "$ROOT.new" --numeric-owner --xattrs \
        --xattrs-include='*' --acls -xpf -
    mv "$ROOT.new" "$ROOT"
    rootfs_id >"$ROOT.id"
    # a new root may have another Python: the persistent venv starts afresh
    rm -rf --one-file-system "$STATE"
    say "restored the $SUITE root from $TARBALL in $(since "$t") s"
}

work=""
nspawn_pid=""
leader=""
command_pid=""

stop_container() {
    [ -n "$nspawn_pid" ] || return 0
    local t deadline
    t=$(now)
    if kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true  # nspawn asks systemd inside to power off
        deadline=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$nspawn_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            say "container did not power off in ${STOP_TIMEOUT} s; terminating it"
            kill -TERM "$nspawn_pid" 2>/dev/null || true  # a second SIGTERM: immediate
            sleep 2
            kill -KILL "$nspawn_pid" 2>/dev/null || true
            [ -z "$leader" ] || kill -KILL "$leader" 2>/dev/null || true
        fi
    fi
    wait "$nspawn_pid" 2>/dev/null || true
    say "container stopped in $(since "$t") s"
    nspawn_pid=""
}

# Kill nsenter; its child inside dies with it (PDEATHSIG).  Wait until that child is
# gone: a power-off that finds it still dying waits 10 s for it.
end_command() {
    local inner deadline
    inner=$(cat "/proc/$command_pid/task/"*/children 2>/dev/null || true)
    kill -KILL "$command_pid" 2>/dev/null || true
    wait "$command_pid" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    for pid in $inner; do
        while [ -e "/proc/$pid" ] && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
    done
    command_pid=""
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM HUP
    # the command first (and with it, everything it started inside), then the container
    [ -z "$command_pid" ] || end_command
    stop_container
    [ -z "$work" ] || rm -rf --one-file-system "$work"
    exit "$status"
}

# What runs killed outright left in /tmp (their owner is gone).
remove_stale_work_dirs() {
    local dir pid
    for dir in /tmp/chatmaild-"$NAME".*; do
        [ -d "$dir" ] || continue
        pid=$(cat "$dir/owner.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then continue; fi
        # a run that has only just made its directory has not written owner.pid yet
        if [ -z "$pid" ] && [ -z "$(find "$dir" -maxdepth 0 -mmin +1)" ]; then continue; fi
        rm -rf --one-file-system "$dir"
    done
}

# Local directories pip is told to read (find-links, file:// indexes) in the
# host's pip configuration and PIP_* environment: they are bind-mounted read-only
# (for a PEP 503 ".../simple" index its parent, where the files usually are).
pip_local_dirs() {
    {
        for f in "${PIP_CONFIGS[@]}"; do [ -f "$f" ] && cat "$f"; done
        env | grep -E '^PIP_(FIND_LINKS|INDEX_URL|EXTRA_INDEX_URL)=' || true
    } | grep -oE '(file://)?/[^ ,;"]+' | sed -e 's|^file://||' -e 's|/$||' -e 's|/simple$||' \
        | while read -r path; do
            [ -d "$path" ] && echo "$path"
        done | sort -u
}
PIP_CONFIGS=(/etc/pip.conf "$HOME/.config/pip/pip.conf")
HOST_CA=/etc/ssl/certs/ca-certificates.crt
# not below /etc, /var, /usr/local or /home: the install test overlays those
INSIDE_CA=/usr/share/chatmaild/host-ca.crt

container_leader() {
    local child
    for child in $(cat "/proc/$nspawn_pid/task/"*/children 2>/dev/null); do
        if grep -qE '^NSpid:.*[[:space:]]1$' "/proc/$child/status" 2>/dev/null; then
            echo "$child"
            return 0
        fi
    done
    return 1
}

# Wait until systemd inside has finished booting (it answers only once it runs).
wait_booted() {
    local deadline=$((SECONDS + BOOT_TIMEOUT)) state=""
    while [ $SECONDS -lt $deadline ]; do
        kill -0 "$nspawn_pid" 2>/dev/null || break
        if [ -n "$leader" ] || leader=$(container_leader); then
            state=$(nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null || true)
            case "$state" in
                running) return 0 ;;
                degraded)
                    say "booted degraded; failed units:"
                    nsenter -t "$leader" -a systemctl --failed --no-legend >&2 || true
                    return 0
                    ;;
            esac
        fi
        sleep 0.1
    done
    cat "$work/boot.log" >&2
    [ -z "$leader" ] || nsenter -t "$leader" -a journalctl -b --no-pager 2>/dev/null | tail -30 >&2
    die "container did not boot (state: ${state:-none})"
}

run_inside() {
    local mode=$1 t rc cwd binds=() envs=() dir f
    shift
    mkdir -p "$CACHE"
    # Containers share the unpacked root (read-only under their overlays) and the
    # venv: a run holds a shared lock, building or unpacking needs it exclusively.
    exec {run_lock}>"$CACHE/$VARIANT.lock"
    flock -s "$run_lock"
    if [ "$REFRESH" = 1 ] || ! cache_is_fresh || ! unpacked_is_current; then
        flock -u "$run_lock"
        if ! flock -n -x "$run_lock"; then
            say "waiting for other $NAME runs to end before rebuilding the root"
            flock -x "$run_lock"
        fi
        ensure_rootfs
        ensure_unpacked
        flock -s "$run_lock"
    fi
    mkdir -p "$STATE" "$PIP_CACHE"
    remove_stale_work_dirs
    work=$(mktemp -d "/tmp/chatmaild-$NAME.XXXXXX")
    echo $$ >"$work/owner.pid"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP

    # the host's CA bundle (it may hold a local proxy's CA) and pip configuration
    if [ -f "$HOST_CA" ]; then
        binds+=("--bind-ro=$HOST_CA:$INSIDE_CA")
        envs+=("PIP_CERT=$INSIDE_CA")
    fi
    for f in "${PIP_CONFIGS[@]}"; do
        [ -f "$f" ] || continue
        sed "s|^\(cert *= *\).*|\1$INSIDE_CA|" "$f" >"$work/$(echo "$f" | tr / _)"
        binds+=("--bind-ro=$work/$(echo "$f" | tr / _):$f")
    done
    while read -r dir; do
        [ -n "$dir" ] && binds+=("--bind-ro=$dir")
    done < <(pip_local_dirs)
    for var in PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_DEFAULT_TIMEOUT \
        PIP_DISABLE_PIP_VERSION_CHECK; do
        [ -z "${!var:-}" ] || envs+=("$var=${!var}")
    done
    binds+=("--bind=$SRC")
    if [ "$BARE" = 0 ]; then
        binds+=("--bind=$STATE:/var/lib/chatmaild-test" "--bind=$PIP_CACHE:/root/.cache/pip")
    fi
    [ "$PRIVATE_NETWORK" = 0 ] || binds+=(--private-network)
    binds+=("${EXTRA_BINDS[@]}")
    # a git worktree keeps its repository elsewhere (tests list the checkout's files)
    dir=$(git -C "$SRC" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
    case "$dir" in "" | "$SRC"/*) ;; *) binds+=("--bind-ro=$dir") ;; esac

    t=$(now)
    # its own session: a Ctrl-C meant for the command must not reach nspawn;
    # PDEATHSIG: if this script dies without cleaning up, the container still powers off
    setpriv --pdeathsig TERM setsid "${NSPAWN_COMMON[@]}" -b -D "$ROOT" --volatile=overlay \
        --machine="chatmaild-$NAME-$$" --resolv-conf=copy-host --timezone=off --console=pipe \
        "${binds[@]}" </dev/null >"$work/boot.log" 2>&1 {run_lock}>&- &
    nspawn_pid=$!
    wait_booted
    say "booted $(nsenter -t "$leader" -a sh -c '. /etc/os-release; echo "$PRETTY_NAME"') in $(since "$t") s"

    # same working directory inside when it is in the checkout
    cwd=$SRC
    case "$PWD/" in "$SRC"/*) cwd=$PWD ;; esac
    t=$(now)
    rc=0
    # PDEATHSIG twice: nsenter dies with this script, the command with nsenter.  An
    # orphaned nsenter would stop itself when the container's shutdown stops its
    # child (it mirrors job control) and never reap it: the power-off would hang.
    local inside=(setpriv --pdeathsig KILL nsenter -t "$leader" -a --
        setpriv --pdeathsig KILL env -i
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" "${envs[@]}"
        /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$cwd" "$@")
    if [ "$mode" = boot ]; then
        # the caller runs what it wants with nsenter -t PID; SIGTERM powers off
        echo "$leader"
        sleep infinity &
        command_pid=$!
        wait "$command_pid" || rc=$?
        command_pid=""
    elif [ "$mode" = interactive ]; then
        # a shell owns the terminal: Ctrl-C is for the shell inside
        "${inside[@]}" || rc=$?
    else
        # in the background, so that a signal to this script is handled at once
        # (bash runs traps only between foreground commands)
        "${inside[@]}" <&0 &
        command_pid=$!
        wait "$command_pid" || rc=$?
        command_pid=""
    fi
    say "command exited $rc after $(since "$t") s"
    return "$rc"
}

# ---------------------------------------------------------------- main

[ $# -gt 0 ] || usage
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, systemd-nspawn)"
cmd=$1
shift
case "$cmd" in
    build)
        need_host_tools
        mkdir -p "$CACHE"
        exec {run_lock}>"$CACHE/$VARIANT.lock"
        flock "$run_lock"
        build_rootfs
        ensure_unpacked
        ;;
    run)
        [ $# -gt 0 ] || usage
        need_host_tools
        run_inside batch "$@"
        ;;
    shell)
        need_host_tools
        run_inside interactive /bin/bash -l
        ;;
    boot)
        need_host_tools
        run_inside boot true
        ;;
    -h | --help | help) usage 0 ;;
    *) usage ;;
esac
