"""The tiny nnU-Net fixture: trained once by nnU-Net's own pipeline (:mod:`CTXAILib.synthetic.nnunet`), cached on
disk under a hash of its recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from CTXAILib.errors import CTXAIError


@pytest.fixture(scope="session")
def nnunet_folder() -> Path:
    """``…/nnUNet_results/Dataset501_CTXAIPores/TinyTrainer__nnUNetPlans__3d_fullres`` with folds 0 and 1."""
    pytest.importorskip("nnunetv2")
    from CTXAILib.synthetic.nnunet import tiny_nnunet

    try:
        return tiny_nnunet()
    except CTXAIError as exc:
        pytest.fail(str(exc))
