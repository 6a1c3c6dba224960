#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs CTXAI with its test
# dependencies. Idempotent: a stamp holding the hash of the inputs skips the install when nothing changed.
# Source it from the other scripts; it exports CTXAI_PY (the venv's python) and activates the venv.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
stamp="$venv/.ctxai-installed"
want="$(cat "$repo/pyproject.toml" "$repo/Utilities/constraints.txt" "$repo/Utilities/bootstrap.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing CTXAI and its dependencies into $venv (first run only)" >&2
  # torch first, pinned, on its own: pip would otherwise resolve the newest CUDA build.
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "torch==2.13.0"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -c "$repo/Utilities/constraints.txt" -e "$repo[test]"
  echo "$want" > "$stamp"
fi
# The HTML report tests open the reports in a real headless Chromium (Debian's package). Installed once when missing
# and this shell may (root with apt-get); otherwise those tests skip and say why.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing chromium for the HTML report tests (first run only)" >&2
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } \
      >/dev/null 2>&1 || echo "[bootstrap] could not install chromium: the HTML report tests will skip" >&2
  else
    echo "[bootstrap] chromium is missing (install it: apt-get install chromium): the HTML report tests will skip" >&2
  fi
fi
export CTXAI_PY="$venv/bin/python"
export PATH="$venv/bin:$PATH"
# Headless machines: VTK renders offscreen through EGL, matplotlib without a display.
export MPLBACKEND=Agg
