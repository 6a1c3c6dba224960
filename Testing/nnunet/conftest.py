"""The tiny nnU-Net fixture: trained once by nnU-Net's own pipeline, cached on disk under a hash of its recipe."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RECIPE = HERE / "build_tiny_nnunet.py"
RESULTS = Path("nnUNet_results/Dataset501_CTXAIPores/TinyTrainer__nnUNetPlans__3d_fullres")


def _recipe_key() -> str:
    """What the trained folder depends on: the recipe, the phantom generator and the training libraries."""
    digest = hashlib.sha256(RECIPE.read_bytes())
    digest.update((REPO / "CTXAI" / "CTXAILib" / "synthetic" / "phantom.py").read_bytes())
    for name in ("nnunetv2", "torch", "dynamic_network_architectures", "numpy"):
        digest.update(f"{name}={metadata.version(name)}".encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def nnunet_folder() -> Path:
    """``…/nnUNet_results/Dataset501_CTXAIPores/TinyTrainer__nnUNetPlans__3d_fullres`` with folds 0 and 1."""
    pytest.importorskip("nnunetv2")
    cache = Path(os.environ.get("CTXAI_TEST_CACHE", Path.home() / ".cache" / "ctxai-tests"))
    built = cache / f"nnunet-{_recipe_key()}"
    if not (built / RESULTS / "fold_1" / "checkpoint_final.pth").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".nnunet-", dir=cache))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "CTXAI"), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, str(RECIPE), str(staging)], env=env, capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.fail(f"building the tiny nnU-Net failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        shutil.rmtree(staging / "nnUNet_preprocessed")  # only the results folder is read by the tests
        try:
            os.rename(staging, built)
        except OSError:  # another test process finished first: its folder is the same recipe's
            shutil.rmtree(staging, ignore_errors=True)
    return built / RESULTS
