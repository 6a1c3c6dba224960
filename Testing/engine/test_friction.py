"""Issue 15's friction points, each on a 1-channel sigmoid TorchScript U-Net made here (it stands in for a lab's
own model): a second activation, class names that do not fit the output, a clicked point for the confidence map,
a ROI predicting only its region, the up-front cost estimate, the intensity and per-axis spacing warnings, the
sliding-window overlap and blend, and the bare-model warning said once."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctxai_testing import calibrate_batchnorm, ct_volume

from CTXAILib import Box, BoxRegion, ComponentRegion, Explainer, MethodError, ModelError, RegionError, Target, Volume
from CTXAILib import load_model, read_volume
from CTXAILib.cli import main
from CTXAILib.engine.networks import UNet3D
from CTXAILib.engine.sliding import TileGrid, crop_padded

WINDOW = (-1000.0, 4000.0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A U-Net (BatchNorm calibrated on CT-like input) whose head is rescaled so that its logits span about +-8
    with a tenth of the pore volume's voxels positive; written bare with a sigmoid (probabilities out, no card)
    and as logits. Returns the folder."""
    folder = tmp_path_factory.mktemp("friction")
    torch.manual_seed(0)
    net = UNet3D(out_channels=1, widths=(4, 8))
    calibrate_batchnorm(net, (24, 24, 24))
    x = torch.from_numpy(np.clip((ct_volume((32, 32, 32)).array - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1))
    with torch.no_grad():
        logits = net(x[None, None])
        q90, spread = torch.quantile(logits.flatten(), 0.9), logits.std()
        net.head.weight *= 8.0 / spread
        net.head.bias.copy_((net.head.bias - q90) * 8.0 / spread)
    example = torch.zeros(1, 1, 24, 24, 24)
    torch.jit.trace(nn.Sequential(net, nn.Sigmoid()), example).save(str(folder / "probabilities.pt"))
    torch.jit.trace(net, example).save(str(folder / "logits.pt"))
    torch.save(net.state_dict(), folder / "logits-state.pt")  # the same network, hookable: to count its passes
    return folder


def _card(folder: Path, name: str, weights: str, **changes) -> Path:
    card = {"name": name, "task": "segmentation", "class_names": ["pore"], "format": "torchscript",
            "weights": weights, "patch_size": [24, 24, 24], "spacing_mm": [0.2, 0.2, 0.2],
            "normalization": {"type": "window", "window": list(WINDOW)}, "output_activation": "sigmoid", **changes}
    path = folder / f"{name}.card-for-test.json"  # never found beside a weights file: the bare models stay bare
    path.write_text(json.dumps(card))
    return path


@pytest.fixture(scope="session")
def logits_explainer(trained):
    """One explainer of the logits network behind a card (sigmoid), shared: its batch sizes are measured once."""
    return Explainer(_card(trained, "logits-card", "logits.pt"), device="cpu")


@pytest.fixture(scope="session")
def pore_volume():
    return ct_volume((32, 32, 32))


@pytest.fixture(scope="session")
def pore_file(tmp_path_factory, pore_volume):
    from CTXAILib import write_volume

    return write_volume(pore_volume, tmp_path_factory.mktemp("friction-volumes") / "ct.nrrd")


def test_bare_probability_model_gets_no_second_activation_and_one_warning(trained, pore_file, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is said once, as the run's line, never as a Python warning
        model = load_model(trained / "probabilities.pt")
        assert model.card.output_activation == "none"
        assert main(["explain", "--volume", str(pore_file), "--model", str(trained / "probabilities.pt"),
                     "--method", "confidence", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.count("has no model card") == 1 and "no output activation (its output on probes is already" in err
    # The model's own probabilities, not squashed into 0.50-0.73 by a second sigmoid.
    confidence = read_volume(tmp_path / "run" / "confidence.nrrd").array
    with torch.no_grad():
        own = model(torch.from_numpy(read_volume(pore_file).array)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(confidence, own, atol=1e-3)
    assert confidence.min() < 0.5 < confidence.max()
    # Control: the same network's logits get the sigmoid assumed.
    assert load_model(trained / "logits.pt").card.output_activation == "sigmoid"


def test_a_second_activation_is_refused_and_logits_are_not(trained, pore_volume, logits_explainer):
    probabilities = _card(trained, "sigmoid-on-probabilities", "probabilities.pt")
    roi = Target(region=BoxRegion(Box((12, 12, 12), (20, 20, 20))))
    with pytest.raises(ModelError, match="already outputs probabilities.*every value lies in \\[0, 1\\].*"
                                         "second activation.*\"output_activation\": \"none\""):
        Explainer(probabilities, device="cpu").explain(pore_volume, "saliency", roi)
    none = _card(trained, "probabilities-none", "probabilities.pt", output_activation="none")
    once = logits_explainer.explain(pore_volume, "confidence", roi).confidence.array  # control: sigmoid on logits
    own = Explainer(none, device="cpu").explain(pore_volume, "confidence", roi).confidence.array
    np.testing.assert_array_equal(np.isnan(once), np.isnan(own))
    np.testing.assert_allclose(once[~np.isnan(once)], own[~np.isnan(own)], atol=1e-3)


def test_class_count_mismatch_fails_at_load_in_one_line(trained, pore_file, tmp_path, capsys):
    card = _card(trained, "two-names", "logits.pt", class_names=["background", "pore"])
    with pytest.raises(ModelError, match="has 1 output channel\\(s\\) but its card names 2 class\\(es\\)"):
        Explainer(card, device="cpu")
    for extra in (["--method", "confidence"], ["--method", "saliency", "--point", "16,16,16"]):
        code = main(["explain", "--volume", str(pore_file), "--model", str(card), "--device", "cpu", "--quiet",
                     "--out", str(tmp_path / "run"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "IndexError" not in err and "class_names" in err
        assert not (tmp_path / "run").exists()


def test_point_for_confidence_needs_no_predicted_component(logits_explainer, pore_volume):
    explainer = logits_explainer
    predicted = explainer.class_mask(pore_volume, 0)
    assert 0 < predicted.mean() < 0.5
    k, j, i = np.argwhere(~predicted)[len(np.argwhere(~predicted)) // 2]
    click = Target(region=ComponentRegion((i, j, k)))
    result = explainer.explain(pore_volume, "confidence", click)
    assert any(f"No predicted region of class 'pore' at voxel {(int(i), int(j), int(k))}" in w
               for w in result.warnings)
    assert result.extent.shape == (24, 24, 24) and not result.extent.intersect(Box((i, j, k), (i + 1, j + 1, k + 1))).empty
    with pytest.raises(RegionError, match="No predicted region of class 'pore' at voxel"):
        explainer.explain(pore_volume, "saliency", click)
    k, j, i = np.argwhere(predicted)[0]
    inside = explainer.explain(pore_volume, "confidence", Target(region=ComponentRegion((i, j, k))))
    assert inside.prediction["predicted_voxels_in_region"] == inside.prediction["region_voxels"]  # the component


def test_roi_predicts_only_its_region(trained):
    card = _card(trained, "logits-state", "logits-state.pt", format="state_dict",
                 architecture={"name": "ctxai.UNet3D", "params": {"out_channels": 1, "widths": [4, 8]}})
    explainer = Explainer(card, device="cpu")
    large = ct_volume((72, 72, 72))
    seen = []  # every sample the model is given; batch-size timing and probes give it noise and zeros
    explainer.model.module.register_forward_pre_hook(lambda _module, inputs: seen.extend(inputs[0].clone()))
    roi = Target(region=BoxRegion(Box((30, 30, 30), (38, 38, 38))))
    grid = TileGrid(large.shape, (24, 24, 24), explainer.overlap)
    result = explainer.explain(large, "confidence", roi)
    x = explainer.prepare(large).x

    def predicted_tiles() -> list[Box]:
        return [tile for tile in grid.tiles if any(torch.equal(crop_padded(x, tile)[0], sample) for sample in seen)]

    touching = grid.select(roi.region.box)
    assert predicted_tiles() == touching and len(touching) == 8 and len(grid.tiles) == 64
    confidence = result.confidence.array
    inside = (slice(30, 38),) * 3
    assert np.isfinite(confidence[inside]).all() and np.isnan(confidence).sum() == confidence.size - 8 ** 3
    # Exact there: the same as the whole volume's blended prediction.
    whole = explainer.segmentation_probabilities(explainer.prepare(large))[0]
    np.testing.assert_allclose(confidence[inside], whole[inside].astype(np.float32), atol=1e-3)
    assert predicted_tiles() == grid.tiles  # the control: the instrument sees a whole-volume prediction


def test_cost_estimate_refuses_a_long_run_unless_forced(trained, pore_volume):
    explainer = Explainer(_card(trained, "logits-card", "logits.pt"), device="cpu", time_limit_s=1e-3)
    roi = Target(region=BoxRegion(Box((2, 2, 2), (6, 6, 6))))  # in one tile: 32 passes of SmoothGrad
    with pytest.raises(MethodError, match=r"would take about .* \(32 model passes x .* s per pass measured on cpu\)"
                                          r".*--set samples=.*--force"):
        explainer.explain(pore_volume, "smoothgrad", roi, settings=dict(samples=32))
    explainer.force = True
    forced = explainer.explain(pore_volume, "smoothgrad", roi, settings=dict(samples=32))
    assert forced.timings["estimate_s"] > 1e-3 and forced.attribution.array.any()
    assert "estimate_s" not in explainer.explain(pore_volume, "saliency", roi).timings  # 1 pass: not timed


def test_bare_model_without_patch_warns_its_memory(trained):
    volume = ct_volume((64, 64, 64))
    explainer = Explainer(trained / "probabilities.pt", device="cpu")
    result = explainer.explain(volume, "saliency")
    giant = [w for w in result.warnings if "has no patch size" in w]
    # The activations measured on the 32³ probe, scaled to the 64³ extent (8x), for forward and backward (3x).
    expected = explainer._sample_bytes((32, 32, 32)) * 8 * 3 / 2 ** 30
    assert 0.1 < expected < 0.3  # the U-Net's activations at 64³: about 60 input-sized float maps
    assert len(giant) == 1 and f"64x64x64 (k,j,i) extent at once: about {expected:.2g} GiB" in giant[0]


def test_intensity_and_zero_map_warnings(logits_explainer, pore_volume):
    explainer = logits_explainer
    roi = Target(region=BoxRegion(Box((12, 12, 12), (20, 20, 20))))
    assert not [w for w in explainer.explain(pore_volume, "confidence", roi).warnings if "window" in w]  # control
    concrete = pore_volume.with_array(pore_volume.array + 6000.0)  # most voxels above the card's window
    result = explainer.explain(concrete, "integrated_gradients", roi, settings=dict(baseline="part_mean", steps=2))
    clipped = [w for w in result.warnings if "outside the card's window" in w]
    assert len(clipped) == 1 and "% above" in clipped[0]
    above = float(clipped[0].split("below, ")[1].split(" %")[0])
    assert above == pytest.approx(100 * np.mean(concrete.array > WINDOW[1]), abs=0.5)
    assert any("map is zero everywhere" in w for w in result.warnings) and not result.attribution.array.any()
    narrow = pore_volume.with_array((pore_volume.array + 1000.0) / 40.0)  # 8-bit-like grey values
    assert any("span" in w and "of the card's window" in w for w in explainer.explain(narrow, "confidence", roi)
               .warnings)


def test_spacing_warning_gives_the_factor_per_axis(logits_explainer, pore_volume):
    explainer = logits_explainer  # its card: 0.2 mm along every axis
    volume = Volume(pore_volume.array, spacing=(0.156, 0.156, 1.3))
    roi = Target(region=BoxRegion(Box((12, 12, 12), (20, 20, 20))))
    spacing = [w for w in explainer.explain(volume, "saliency", roi).warnings if "Voxel spacing" in w]
    assert len(spacing) == 1 and "1.28x in-plane (i, j), 0.154x through-plane (k)" in spacing[0]
    assert "(0.156, 0.156, 1.3) mm" in spacing[0]
    assert not explainer._spacing_warnings(pore_volume)  # control: the trained spacing


def test_overlap_and_blend_change_the_tiling(trained, tmp_path):
    card = _card(trained, "windowed", "logits.pt", sliding_window={"overlap": 0.5, "blend": "constant"})
    volume = ct_volume((48, 48, 48))
    explainer = Explainer(card, device="cpu")
    assert (explainer.overlap, explainer.blend) == (0.5, "constant")
    assert len(explainer._grid(volume.shape).tiles) == 27
    constant = explainer.segmentation_probabilities(explainer.prepare(volume))[0].astype(np.float32)
    # A constant blend is the plain average of the tiles covering a voxel: check it at one voxel by hand.
    model, x = explainer.model, explainer.prepare(volume).x
    with torch.no_grad():
        covering = [torch.sigmoid(model(crop_padded(x, Box((0, 0, k), (24, 24, k + 24)))))[0, 0, 20 - k, 5, 5]
                    for k in (0, 12)]
    assert constant[20, 5, 5] == pytest.approx(float(sum(covering) / 2), abs=1e-3)
    explainer.set_sliding_window(0.0, "gaussian")
    assert len(explainer._grid(volume.shape).tiles) == 8
    gaussian = explainer.segmentation_probabilities(explainer.prepare(volume))[0].astype(np.float32)
    assert np.abs(gaussian - constant).max() > 1e-2
    with pytest.raises(ModelError, match="sliding_window.blend' must be one of gaussian, constant"):
        Explainer(_card(trained, "bad-blend", "logits.pt", sliding_window={"blend": "median"}), device="cpu")
    from CTXAILib import write_volume

    volume_file = write_volume(volume, tmp_path / "ct48.nrrd")
    # The command line overrides the card's 0.5 / constant: a ROI at the middle then meets 2 tiles per axis, not 3.
    assert main(["explain", "--volume", str(volume_file), "--model", str(card), "--method", "saliency",
                 "--overlap", "0", "--blend", "gaussian", "--roi", "20,20,20,28,28,28", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "run")]) == 0
    window = json.loads((tmp_path / "run" / "run.json").read_text())["window"]
    assert (window["overlap"], window["blend"], window["tiles"]) == (0.0, "gaussian", 8)
    assert len(Explainer(card, device="cpu")._grid(volume.shape).select(Box((20, 20, 20), (28, 28, 28)))) == 27
