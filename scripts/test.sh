#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with Python 3.11: installs what it needs,
# then runs the linters, the type checker, the layer contracts and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v etcd >/dev/null 2>&1 || ! command -v nginx >/dev/null 2>&1 \
    || ! command -v ip >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    # etcd for the store tests, nginx for the benchmark harness's smoke test.
    # iproute2 for the chaos suite's network namespaces.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server nginx-light iproute2 >/dev/null
    # The packages may start system services on 2379 and 80; tests start their own.
    $SUDO systemctl disable --now etcd nginx >/dev/null 2>&1 || true
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy
lint-imports --no-cache
python3 -m pytest "$@"
