"""Helpers of the records tests: the `ctxai` command as a subprocess, and where the test CT's pore lies."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CTXAI = shutil.which("ctxai") or str(Path(sys.executable).with_name("ctxai"))
PORE_IJK = (10, 20, 13)  # off the centre of the 32^3 block, so that a map drawn at the centre would miss it
ROI = "7,17,10,14,24,17"


def ctxai(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CTXAI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
