#!/usr/bin/env bash
# Debian 13 "trixie": scripts/debian-root.sh trixie (see there).
#
#   scripts/debian13.sh run make test VENV=/var/lib/chatmaild-test/venv
#   scripts/debian13.sh run make run STATE=/tmp/relay13
#   scripts/debian13.sh shell
#   scripts/debian13.sh build
exec "$(dirname "$0")/debian-root.sh" trixie "$@"
