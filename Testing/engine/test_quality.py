"""Faithfulness numbers: a real explanation of the trained classifier beats a random voxel order, a random map
does not, and the numbers reach the run record."""

from __future__ import annotations

import numpy as np
import pytest

from CTXAILib import BoxRegion, Box, Explainer, Target
from CTXAILib.checks.faithfulness import faithfulness_check
from CTXAILib.synthetic.evaluation import bundled_model
from CTXAILib.synthetic.phantom import generate_phantom


@pytest.fixture(scope="module")
def pore_case():
    phantom = generate_phantom(900_300, (96, 96, 96))
    pore = max((d for d in phantom.defects if d.type == "pore"), key=lambda d: d.voxel_count)
    centre = tuple(int(v) for v in np.round(pore.centre))
    return phantom.ct, Target("pore", region=BoxRegion(Box(centre, tuple(c + 1 for c in centre))))


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients"])
def test_real_maps_beat_random_order(pore_case, method):
    ct, target = pore_case
    explainer = Explainer(bundled_model("classifier"), device="cpu")
    result = explainer.explain(ct, method, target, evaluate=faithfulness_check)
    quality = result.quality
    assert quality["deletion_auc"] < quality["deletion_auc_random"] - 0.05, quality
    assert quality["insertion_auc"] > quality["insertion_auc_random"] + 0.05, quality
    assert "quality_s" in result.timings


def test_random_map_is_no_better_than_chance(pore_case):
    from CTXAILib.checks.faithfulness import faithfulness
    import torch

    ct, target = pore_case
    explainer = Explainer(bundled_model("classifier"), device="cpu")
    result = explainer.explain(ct, "saliency", target, output="extent")
    x = torch.from_numpy(explainer.model.card.normalization.apply(result.attribution.array * 0 +
                                                                  ct.crop(result.extent).array))[None, None]
    fill = torch.full_like(x, float(explainer.model.card.normalization.apply(-1000.0)))
    model = explainer.model

    def forward(batch):
        with torch.no_grad():
            return model(batch)[:, 1]

    noise = np.random.default_rng(5).random(result.attribution.shape)
    quality = faithfulness(forward, x, fill, noise, seed=1)
    assert abs(quality["deletion_auc"] - quality["deletion_auc_random"]) < 0.1, quality
