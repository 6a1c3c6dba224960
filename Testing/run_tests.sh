#!/usr/bin/env bash
# The README's test command: sets up .venv if needed, then runs the whole test suite on CPU.
# Two pytest-xdist workers, a test file each at a time (module fixtures such as the demo's are built once); the
# slowest files start first (Testing/conftest.py). CTXAI_TEST_WORKERS=0 runs everything in one process.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/Utilities/bootstrap.sh"
cd "$repo"
workers="${CTXAI_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  exec "$CTXAI_PY" -m pytest -q Testing "$@"
fi
# One torch thread per worker (and per process a test starts): two workers of two threads each on two cores would
# fight over them.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$CTXAI_PY" -m pytest -q -n "$workers" --dist loadfile --durations=15 Testing "$@"
