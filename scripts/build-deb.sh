#!/usr/bin/env bash
# make deb: build the Debian package for the release this machine runs (Debian 12 or
# 13; the same source builds on both) and leave it as dist/chatmaild_<version>_all.deb
# (DIST=dir: elsewhere; relative to the checkout).
# Installs the build dependencies first.  Builds in a copy of the checkout (tracked and
# untracked, not ignored, files), so the tree stays clean.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
DIST=${DIST:-dist}
say() { printf 'deb: %s\n' "$*" >&2; }

# shellcheck source=scripts/packages.sh
. scripts/packages.sh
apt_install_missing "${BUILD_PACKAGES[@]}" "${RUNTIME_PACKAGES[@]}"

work=$(mktemp -d /tmp/chatmaild-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/chatmaild"
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$SRC" ls-files -z --cached --others --exclude-standard |
        (cd "$SRC" && xargs -0 cp --parents -t "$work/chatmaild" 2>/dev/null) || true
else
    tar -C "$SRC" --exclude=./.venv --exclude=./dist --exclude=./state -cf - . |
        tar -C "$work/chatmaild" -xf -
fi
cd "$work/chatmaild"
dpkg-checkbuilddeps
version=$(dpkg-parsechangelog -S Version)
log=$work/build.log
# Debian's own tools and python3, whatever else is first on PATH (pyenv, a venv)
if ! env -u PYTHONPATH -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -us -uc -b >"$log" 2>&1; then
    tail -40 "$log" >&2
    say "dpkg-buildpackage failed (log above)"
    exit 1
fi
deb=chatmaild_${version}_all.deb
cd "$SRC"
mkdir -p "$DIST"
cp "$work/$deb" "$DIST/$deb"
say "built $DIST/$deb on $(. /etc/os-release; echo "$PRETTY_NAME")"
