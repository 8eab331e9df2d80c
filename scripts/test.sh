#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite,
# the lab tests included (real libvirtd + QEMU guests in network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
