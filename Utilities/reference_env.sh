#!/usr/bin/env bash
# Creates (or reuses) .venv-reference, the environment of the nnunetv2-cam reference that `ctxai bench --cases
# nnunet-cam` compares CTXAI's Grad-CAM with; the bench runs this script for that case only, never the tests or CI.
# nnunetv2-cam needs grad-cam, which imports torchvision at import time, and PyPI's torchvision does not import
# beside the project's CPU torch, so the reference has its own torch (a CUDA build, several GB; it runs on the CPU).
# Idempotent: a stamp holding the hash of this script skips the install when nothing changed. Prints the
# environment's python on its last line.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv-reference"
stamp="$venv/.ctxai-reference-installed"
want="$(sha256sum "$repo/Utilities/reference_env.sh" | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[reference] installing nnunetv2-cam and its own torch into $venv (first run only)" >&2
  # torch and torchvision first, as a matching pair: grad-cam imports torchvision, which must fit that torch.
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "torch==2.14.1" "torchvision==0.29.1" >&2
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "nnunetv2==2.8.1" "nnunetv2-cam==0.1.6.1" \
    "grad-cam==1.5.7" >&2
  "$venv/bin/python" -c "import nnunetv2_cam, pytorch_grad_cam" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
