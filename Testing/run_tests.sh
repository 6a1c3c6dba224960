#!/usr/bin/env bash
# The README's test command: sets up .venv if needed, then runs the whole test suite on CPU.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/Utilities/bootstrap.sh"
cd "$repo"
exec "$CTXAI_PY" -m pytest -q Testing "$@"
