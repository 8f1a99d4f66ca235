#!/usr/bin/env bash
# README command 2: the whole test suite, as root (containers start as the test user).
# Installs what the tests need first (scripts/setup.sh is idempotent), then runs pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${HPCIMAGE_VENV:-/opt/hpcimage/venv}
bash "$here/scripts/setup.sh"
cd "$here"
exec "$venv/bin/python3" -m pytest -p no:cacheprovider -ra "$@"
