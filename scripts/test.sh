#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with Python 3.11. It proves that a fresh
# environment is enough: it apt-installs the system tools the tests start (etcd, nginx,
# iproute2, nodejs and npm, and python3-venv if `venv` cannot bootstrap pip), recreates its own
# virtualenv in .venv-test/ with nothing in it but `pip install -e '.[test,bench]'` (mypy checks
# bench/, which imports matplotlib and uvloop), then runs ruff, ruff format --check, mypy, the
# import-linter contracts, `npm ci --prefix tests/ts` (the TypeScript SDK client's packages, when
# the lockfile changed) and pytest, all with that virtualenv's tools. Arguments go to pytest.
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
# The install builds the run core (sidecar/_runcore.c) and the compiled-cores test builds the
# sans-IO cores with mypyc: both need a C compiler and Python's headers.
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
python3 -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' \
    >/dev/null 2>&1 || need_apt+=(python3-dev)
# Debian's python3 ships `venv` without ensurepip; python3-venv brings it.
python3 -c 'import ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# The TypeScript SDK client (tests/ts) runs on Node; Debian's nodejs is 18, which the SDK supports.
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
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
# The TypeScript SDK exactly as tests/ts/package-lock.json pins it. `npm ci` starts by deleting
# node_modules, so it runs only when the lockfile changed since the last install it did (a hash
# stamp, not mtimes, which a checkout resets).
TS=tests/ts
lock_hash="$(sha256sum "$TS/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$TS/node_modules/.tether-lock-sha256" 2>/dev/null)" != "$lock_hash" ]; then
    npm ci --prefix "$TS" --no-audit --no-fund --loglevel=error >/dev/null
    echo "$lock_hash" >"$TS/node_modules/.tether-lock-sha256"
fi

"$PY" -m pytest "$@"
