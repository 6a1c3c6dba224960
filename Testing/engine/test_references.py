"""Correctness against references: Captum and MONAI Grad-CAM, IG completeness, spacing-aware supervoxels, and
the tiled path against the whole-volume path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from CTXAILib import Box, Explainer, Target, load_model
from CTXAILib.engine.supervoxels import supervoxels


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
    reference = cam(normalised(classifier, volume).requires_grad_(), class_idx=2)[0, 0].detach().numpy()
    assert corr(result.attribution.array, reference) >= 0.99


@pytest.fixture(scope="module")
def phantom_patch():
    """A 32^3 patch around a real pore of a held-out phantom, in grey values (what the trained classifier sees)."""
    from CTXAILib.synthetic.phantom import generate_phantom

    phantom = generate_phantom(900_400, (96, 96, 96))
    pore = max((d for d in phantom.defects if d.type == "pore"), key=lambda d: d.voxel_count)
    i, j, k = (int(v) for v in np.round(pore.centre))
    box = Box((i - 16, j - 16, k - 16), (i + 16, j + 16, k + 16)).clip(phantom.ct.shape)
    return phantom.ct.crop(box)


@pytest.mark.parametrize("baseline, steps", [("zeros", 64), ("air", 64), ("part_mean", 64), ("blurred", 128)])
def test_integrated_gradients_completeness(phantom_patch, baseline, steps):
    """On the trained classifier, the map sums to f(x) - f(baseline) within 1 % at 64 steps (128 from the blurred
    baseline, whose path crosses more ReLU boundaries: 1.6 % at 64 steps, 0.3 % at 128)."""
    from CTXAILib.engine.baselines import make_baseline
    from CTXAILib.synthetic.evaluation import bundled_model

    model = load_model(bundled_model("classifier"))
    result = Explainer(model, device="cpu").explain(phantom_patch, "integrated_gradients", Target("pore"),
                                                    settings={"steps": steps, "baseline": baseline})
    x = normalised(model, phantom_patch)
    air = float(model.card.normalization.apply(-1000.0))
    b = make_baseline(baseline, x, air, phantom_patch.spacing, 2.0)
    with torch.no_grad():
        delta = float(model.module(x)[0, 1] - model.module(b)[0, 1])
    total = float(result.attribution.array.sum(dtype=np.float64))
    assert abs(delta) > 0.5, "degenerate check: the baseline hardly changes the pore logit"
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
    from ctxai_testing import ct_volume

    model = load_model(unet_card)
    volume = ct_volume((40, 40, 40))
    explainer = Explainer(model, device="cpu", overlap=0.5, min_tile_share=0.0)
    box = ((12, 12, 12), (30, 28, 26))
    from CTXAILib import BoxRegion

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
    """Where the volume fits in one patch, explaining it through smaller tiles gives the same map (trained U-Net,
    a 64^3 piece of a held-out phantom around a defect; whole = one 64^3 tile, tiled = 48^3 tiles)."""
    import json
    import shutil

    from CTXAILib.synthetic.evaluation import bundled_model
    from CTXAILib.synthetic.phantom import generate_phantom

    card = json.loads(bundled_model("unet").read_text())
    shutil.copy(bundled_model("unet").with_name(card["weights"]), tmp_path / card["weights"])
    card["patch_size"] = [48, 48, 48]
    (tmp_path / "tiled.json").write_text(json.dumps(card))
    phantom = generate_phantom(900_500, (96, 96, 96))
    pore = max((d for d in phantom.defects if d.type == "pore"), key=lambda d: d.voxel_count)
    i, j, k = (int(v) for v in np.round(pore.centre))
    lo = [min(max(c - 32, 0), 96 - 64) for c in (i, j, k)]
    volume = phantom.ct.crop(Box(lo, [v + 64 for v in lo]))
    settings = {"steps": 16} if method == "integrated_gradients" else {}
    maps = [Explainer(path, device="cpu", overlap=0.5, min_tile_share=0.0).explain(
                volume, method, Target("void"), settings=settings).attribution.array
            for path in (bundled_model("unet"), tmp_path / "tiled.json")]
    assert corr(*maps) >= 0.99, corr(*maps)
