"""Fixtures of the reliability campaign (issue 14): the CLI as a real subprocess, and a TorchScript model."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from ctxai_testing import write_torchscript_card


def ctxai(*args, timeout=300, **popen) -> subprocess.CompletedProcess:
    """``python -m CTXAILib.cli ARGS`` as a user would run it; output as text."""
    return subprocess.run([sys.executable, "-m", "CTXAILib.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **popen)


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), by relative path: what "nothing lost" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(out: subprocess.CompletedProcess, *words: str) -> str:
    """The CLI's single ``error: ...`` line (exit 2, no traceback), which must contain ``words``."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def torchscript_card(tmp_path_factory, classifier_card) -> Path:
    return write_torchscript_card(tmp_path_factory.mktemp("torchscript"), classifier_card)
