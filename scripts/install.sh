#!/usr/bin/env bash
# Install pvtool and what its tests need: the Python package (editable) with
# its test extras, and qemu-system-x86 and gdb from apt when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
MISSING=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || MISSING="$MISSING qemu-system-x86"
command -v gdb >/dev/null 2>&1 || MISSING="$MISSING gdb"
if [ -n "$MISSING" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $MISSING >/dev/null
fi
