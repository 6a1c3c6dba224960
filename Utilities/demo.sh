#!/usr/bin/env bash
# The README's demo command: sets up .venv if needed, then runs the embedded default end to end.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/Utilities/bootstrap.sh"
exec ctxai demo --out "${1:-$repo/out/demo}"
