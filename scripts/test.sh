#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), type-checks migsec/ (mypy) and runs the whole test suite,
# the lab tests included (real libvirtd + QEMU guests in network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the types first (setup.cfg's [mypy]: migsec/, default mode); a type error fails the run
if ! .venv/bin/mypy; then
  echo "test.sh: mypy found type errors in migsec/ (see above); not running pytest" >&2
  exit 1
fi
echo "test.sh: mypy clean"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
