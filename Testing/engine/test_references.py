"""Correctness against references: Captum and MONAI Grad-CAM, IG completeness, spacing-aware supervoxels, and
the tiled path against the whole-volume path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from CTXAILib import Explainer, Target, Volume, load_model
from CTXAILib.explain import ScoreModel
from CTXAILib.progress import RunMonitor
from CTXAILib.supervoxels import supervoxels


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def classifier(classifier_card):
    return load_model(classifier_card)


def normalised(model, volume):
    return torch.from_numpy(model.card.normalization.apply(volume.array))[None, None]


def test_gradcam_matches_captum(classifier, volume):
    from captum.attr import LayerAttribution, LayerGradCam

    result = Explainer(classifier, device="cpu").explain(volume, "gradcam", Target("pore"))
    layer = classifier.get_layer("features.block4.conv2")
    reference = LayerGradCam(classifier.module, layer).attribute(normalised(classifier, volume), target=1,
                                                                 relu_attributions=True)
    reference = LayerAttribution.interpolate(reference, volume.shape, "trilinear")[0, 0].detach().numpy()
    assert corr(result.attribution.array, reference) >= 0.99
    np.testing.assert_allclose(result.attribution.array, reference, rtol=1e-4, atol=1e-6 * np.abs(reference).max())


def test_gradcam_matches_monai(classifier, volume):
    monai_visualize = pytest.importorskip("monai.visualize")

    result = Explainer(classifier, device="cpu").explain(volume, "gradcam", Target("crack"))
    # MONAI's default postprocessing min-max normalises (and on some versions inverts) the map: use identity.
    cam = monai_visualize.GradCAM(nn_module=classifier.module, target_layers="features.block4.conv2",
                                  postprocessing=lambda x: x)
    reference = cam(normalised(classifier, volume), class_idx=2)[0, 0].detach().numpy()
    assert corr(result.attribution.array, reference) >= 0.99


@pytest.mark.parametrize("baseline", ["zeros", "air", "blurred", "part_mean"])
def test_integrated_gradients_completeness(classifier, volume, baseline):
    explainer = Explainer(classifier, device="cpu")
    result = explainer.explain(volume, "integrated_gradients", Target("pore"),
                               settings={"steps": 64, "baseline": baseline})
    x = normalised(classifier, volume)
    from CTXAILib.baselines import make_baseline

    b = make_baseline(baseline, x, float(classifier.card.normalization.apply(-1000.0)), volume.spacing, 2.0)
    with torch.no_grad():
        delta = float(classifier.module(x)[0, 1] - classifier.module(b)[0, 1])
    total = float(result.attribution.array.sum(dtype=np.float64))
    assert abs(delta) > 1e-4, "degenerate check: the baseline changes nothing"
    assert abs(total - delta) <= 0.01 * abs(delta), (total, delta)


def test_supervoxels_are_isotropic_in_mm():
    rng = np.random.default_rng(1)
    from scipy import ndimage

    # 48 mm cube sampled at 0.5 x 0.5 x 2.0 mm (i, j, k): 24 slices of 96 x 96.
    image = ndimage.gaussian_filter(rng.normal(size=(24, 96, 96)), (0.5, 2, 2))
    labels = supervoxels(image, spacing=(0.5, 0.5, 2.0), n_segments=100)
    spreads = []
    for label in np.unique(labels):
        voxels = np.argwhere(labels == label)
        if len(voxels) >= 20:
            spreads.append(voxels.std(axis=0) * np.array([2.0, 0.5, 0.5]))
    spreads = np.array(spreads)
    ratio = np.median(spreads[:, 0] / spreads[:, 1:].mean(axis=1))
    assert 0.75 <= ratio <= 1.33, ratio
    assert 50 <= len(np.unique(labels)) <= 150


def test_tiles_add_up_to_the_sliding_window_gradient(unet_card):
    """Tile-wise gradients summed equal autograd through the whole blended sliding-window output (exact)."""
    from conftest import ct_volume

    model = load_model(unet_card)
    volume = ct_volume((40, 40, 40))
    explainer = Explainer(model, device="cpu", overlap=0.5)
    box = ((12, 12, 12), (30, 28, 26))
    from CTXAILib import Box, BoxRegion

    result = explainer.explain(volume, "input_x_gradient", Target("defect", region=BoxRegion(Box(*box))),
                               output="full")
    # Reference: the same sliding window written as one differentiable function.
    grid = explainer._grid(volume.shape)
    x = normalised(model, volume).requires_grad_()
    blended = torch.zeros((2,) + volume.shape)
    weight = torch.zeros(volume.shape)
    for tile in grid.tiles:
        out = model.module(x[(...,) + tile.slices])[0]
        g = torch.from_numpy(grid.importance(tile))
        blended[(slice(None),) + tile.slices] += out * g
        weight[tile.slices] += g
    blended = blended / weight
    target = blended[1][Box(*box).slices].sum()
    (grad,) = torch.autograd.grad(target, x)
    reference = (grad * x)[0, 0].detach().numpy()
    np.testing.assert_allclose(result.attribution.array, reference, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam"])
def test_tiled_path_matches_whole_volume(tmp_path, method):
    """Where the volume fits in one patch, tiling it into smaller patches gives the same map."""
    import json

    from conftest import ct_volume, write_model

    whole_card = write_model(tmp_path, "whole", "segmentation", patch=(48, 48, 48), seed=3)
    tiled = json.loads(whole_card.read_text())
    tiled["patch_size"] = [32, 32, 32]
    (tmp_path / "tiled.json").write_text(json.dumps(tiled))
    volume = ct_volume((48, 48, 48))
    settings = {"steps": 16} if method == "integrated_gradients" else {}
    maps = [Explainer(card, device="cpu", overlap=0.5).explain(volume, method, Target("defect"),
                                                               settings=settings).attribution.array
            for card in (whole_card, tmp_path / "tiled.json")]
    assert corr(*maps) >= 0.99, corr(*maps)
