# shellcheck shell=bash
# Debian packages of a chatmail relay, sourced by install-deps.sh, build-deb.sh and
# scripts/debian-root.sh (inside the Debian system it builds).
# RUNTIME: what a relay runs on (servers, Debian's python3 and chatmaild's libraries):
# what the Debian package depends on (debian/control; tests/test_deb.py compares).

# shellcheck disable=SC1091
. /etc/os-release
RUNTIME_PACKAGES=(
    postfix dovecot-core dovecot-imapd dovecot-lmtpd openssl dehydrated coturn
    iproute2
    python3
    python3-cryptography python3-dkim python3-dnspython python3-filelock python3-h11
    python3-systemd python3-uvloop python3-segno python3-prometheus-client
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
# python3-venv: the test venv; gcc: the no-delay IDLE shim (the package recommends it);
# python3-aiosmtpd: the mail corpus capture and the aiosmtpd front end of make bench;
# python3-aiohttp: the test push service (testing/httpsink.py) and the browser driver;
# pebble: Let's Encrypt's test CA (testing/pebble.py); dnsmasq-base: an authoritative DNS
# server for `chatmaild dns --check` (testing/dnsmasq.py; no service of its own); nftables:
# a firewall in a test's own network namespace (port 25 blocked, tests/test_mxdeliv_send.py);
# python3-aioice: a TURN client (tests/test_turn.py); prometheus: the server that scrapes
# chatmail-metrics in tests/test_metrics.py (started by the test; install-deps.sh stops
# the service the package starts)
TEST_PACKAGES=(gnupg sq zstd util-linux procps git make python3-nacl chromium zbar-tools
    python3-venv gcc libc6-dev python3-aiosmtpd python3-aiohttp pebble dnsmasq-base curl nftables
    python3-aioice prometheus)

# what the package recommends (the no-delay shim's compiler), and the Prometheus
# tests/test_deb.py installs to scrape the packaged relay: --bare roots of
# scripts/debian-root.sh download these too
DEB_EXTRA_PACKAGES=(gcc libc6-dev prometheus)

# what `make deb` needs besides RUNTIME_PACKAGES (debian/control's Build-Depends)
BUILD_PACKAGES=(build-essential debhelper dh-python po-debconf pybuild-plugin-pyproject python3-all
    python3-setuptools dpkg-dev lintian)

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
