# shellcheck shell=bash
# Debian packages of a chatmail relay, sourced by install-deps.sh, install.sh and
# scripts/debian13.sh (inside the Debian 13 system it builds).
# RUNTIME: what a relay runs on (servers, Debian's python3 and chatmaild's libraries);
# the same list the Debian package depends on.

# shellcheck disable=SC1091
. /etc/os-release
RUNTIME_PACKAGES=(
    postfix dovecot-core dovecot-imapd dovecot-lmtpd openssl
    python3 python3-venv
    python3-aiohttp python3-aiosmtpd python3-cryptography python3-dkim python3-dnspython
    python3-filelock python3-systemd python3-uvloop python3-segno
    # the no-delay IDLE shim is compiled against the installed Dovecot (libc6-dev is
    # only a Recommends of gcc: without it a fresh system has no <dlfcn.h>)
    gcc libc6-dev dovecot-dev
)
case "${VERSION_CODENAME:-}" in
    bookworm) ;;
    # Python 3.13 has no crypt module; Dovecot 2.4 creates accounts through Lua
    *) RUNTIME_PACKAGES+=(python3-crypt-r dovecot-auth-lua) ;;
esac

# what the tests use besides the relay itself (install-deps.sh; scripts/debian13.sh
# builds its Debian 13 system from both lists)
# python3-nacl: dkimpy's Ed25519 signing in the DKIM tests; chromium and zbar-tools:
# the web pages in a real browser, their QR code read back
TEST_PACKAGES=(gnupg sq zstd iproute2 util-linux procps git make python3-nacl chromium zbar-tools)

# install the named packages that are missing (no Postfix questions: we configure it)
apt_install_missing() {
    local need=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
    done
    [ ${#need[@]} -gt 0 ] || return 0
    if [ "$(id -u)" != 0 ]; then
        echo "need root to apt-get install: ${need[*]}" >&2
        return 1
    fi
    echo "apt-get install ${need[*]}"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}
