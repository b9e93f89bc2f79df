#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with Python 3.11. It proves that a fresh
# environment is enough: it apt-installs the system tools the tests start (etcd, nginx,
# iproute2, and python3-venv if `venv` cannot bootstrap pip), recreates its own virtualenv in
# .venv-test/ with nothing in it but `pip install -e '.[test,bench]'` (mypy checks bench/, which
# imports matplotlib and uvloop), then runs ruff, ruff format --check, mypy, the import-linter
# contracts and pytest, all with that virtualenv's tools. Arguments go to pytest.
#
# TETHER_TEST_REUSE_VENV=1 keeps an existing .venv-test/ (it still installs into it, which is
# quick when nothing changed): for developers re-running the suite. CI (.ci/run) never sets it.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-test

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
# nginx for the benchmark harness's smoke test, iproute2 for the chaos suite's network namespaces.
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# The compiled-cores test builds the sans-IO cores with mypyc: a C compiler and Python's headers.
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
python3 -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' \
    >/dev/null 2>&1 || need_apt+=(python3-dev)
# Debian's python3 ships `venv` without ensurepip; python3-venv brings it.
python3 -c 'import ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
    # The packages may start system services on 2379 and 80; tests start their own.
    $SUDO systemctl disable --now etcd nginx >/dev/null 2>&1 || true
fi

if [ "${TETHER_TEST_REUSE_VENV:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,bench]'

# Tests look some tools up on PATH (mypyc, py-spy) and start `python -m ...` with
# sys.executable: both must be this virtualenv's.
export VIRTUAL_ENV="$PWD/$VENV"
export PATH="$VIRTUAL_ENV/bin:$PATH"
PY="$VIRTUAL_ENV/bin/python"

"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy
"$VIRTUAL_ENV/bin/lint-imports" --no-cache
"$PY" -m pytest "$@"
