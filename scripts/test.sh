#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, slow end-to-end tests included.
# MOEFX_SKIP_SETUP=1: the caller has just run scripts/setup.sh (.ci/run does).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${MOEFX_SKIP_SETUP:-}" ] || bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OMP_WAIT_POLICY=PASSIVE MOEFX_QUIET=1
.venv/bin/python -m pytest -q "$@"
