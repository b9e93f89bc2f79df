#!/usr/bin/env bash
# `tether demo` from a fresh Debian machine with Python 3.11, in one command. Debian's python3
# ships `venv` without ensurepip and refuses `pip install` outside a virtualenv (PEP 668), so
# this apt-installs python3-venv when needed, makes a virtualenv in .venv-demo/ (kept between
# runs), installs this checkout with the `demo` extra (the official MCP SDK and uvicorn, which
# the example server needs) and runs `tether demo`. Arguments go to `tether demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-demo
if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check '.[demo]'
exec "$VENV/bin/tether" demo "$@"
