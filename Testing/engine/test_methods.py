"""Every registered method runs through `ctxai explain` on a small classifier and a small U-Net, and returns a
finite map in the input's exact geometry, with a complete run record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CTXAILib import MethodError, list_methods, read_volume
from CTXAILib.cli import main

FAST = {
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"samples": 4},
    "gradient_shap": {"samples": 4, "baselines": 2},
    "deepshap": {"baselines": 2},
    "occlusion": {"window": 8, "stride": 8},
    "lime": {"samples": 40, "supervoxels": 12},
    "kernel_shap": {"samples": 40, "supervoxels": 12},
    "feature_ablation": {"supervoxels": 12},
}
METHODS = [spec.name for spec in list_methods()]


def run_cli(volume_file, card, method, out, *extra):
    args = ["explain", "--volume", str(volume_file), "--model", str(card), "--method", method, "--out", str(out),
            "--device", "cpu", "--quiet"]
    for key, value in FAST.get(method, {}).items():
        args += ["--set", f"{key}={value}"]
    return main(args + list(extra))


def check_outputs(out, volume, method, segmentation):
    attribution = read_volume(out / "attribution.nrrd")
    assert attribution.shape == volume.shape
    np.testing.assert_array_equal(attribution.ijk_to_ras, volume.ijk_to_ras)
    assert attribution.array.dtype == np.float32
    assert np.all(np.isfinite(attribution.array))
    assert np.any(attribution.array != 0), f"{method} returned an all-zero map"
    record = json.loads((out / "run.json").read_text())
    assert record["method"]["name"] == method
    assert record["input"]["sha256"] and record["model"]["sha256"]
    assert set(record["versions"]) >= {"python", "torch", "captum", "numpy"}
    assert record["device"] == "cpu" and record["timings_s"]["total"] > 0
    assert (out / "confidence.nrrd").exists() == segmentation
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging files left behind"
    return attribution, record


def test_registry_is_complete():
    expected = {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradient_shap", "deeplift",
                "deepshap", "guided_backprop", "gradcam", "gradcam_plus_plus", "hirescam", "layercam",
                "guided_gradcam", "occlusion", "lime", "kernel_shap", "feature_ablation", "lrp", "confidence"}
    assert expected <= set(METHODS)
    for spec in list_methods():
        description = spec.to_dict()
        assert description["family"] in ("gradient", "cam", "perturbation", "relevance", "prediction")
        assert spec.samples(spec.validate({}), (32, 32, 32)) >= 1
        for setting in description["settings"]:
            assert setting["help"] and "default" in setting
            assert spec.validate({setting["name"]: setting["default"]})[setting["name"]] == setting["default"]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "confidence"])
def test_classifier_every_method(method, tmp_path, volume, volume_file, classifier_card):
    assert run_cli(volume_file, classifier_card, method, tmp_path, "--target", "pore") == 0
    _, record = check_outputs(tmp_path, volume, method, segmentation=False)
    assert record["target"]["class"] == "pore"
    assert set(record["prediction"]["probabilities"]) == {"normal", "pore", "crack", "inclusion"}


@pytest.mark.parametrize("method", METHODS)
def test_unet_every_method(method, tmp_path, volume, volume_file, unet_card):
    assert run_cli(volume_file, unet_card, method, tmp_path, "--roi", "10,10,10,22,22,22") == 0
    attribution, record = check_outputs(tmp_path, volume, method, segmentation=True)
    assert record["target"]["class"] == "defect" and record["target"]["region"].startswith("IJK box")
    if method == "confidence":
        confidence = read_volume(tmp_path / "confidence.nrrd")
        inside = (slice(10, 22),) * 3
        np.testing.assert_allclose(attribution.array[inside], confidence.array[inside], rtol=1e-6)


def test_confidence_is_for_segmentation_only(volume, classifier_card):
    from CTXAILib import Explainer

    with pytest.raises(MethodError, match="segmentation model's own probability map"):
        Explainer(classifier_card, device="cpu").explain(volume, "confidence")


def test_point_and_contrast_targets(tmp_path, volume, volume_file, classifier_card):
    assert run_cli(volume_file, classifier_card, "gradcam", tmp_path, "--point", "16,16,16",
                   "--target", "pore", "--contrast", "crack") == 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["target"]["contrast"] == "crack"


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_supervoxel_maps_report_their_ties(method, volume, classifier_card):
    """A supervoxel gives all its voxels one value, so "the strongest voxel" is a tie that the run must report."""
    from CTXAILib import Explainer

    result = Explainer(classifier_card, device="cpu").explain(volume, method, "pore",
                                                             settings={**FAST[method], "supervoxels": 6})
    magnitude = np.abs(result.attribution.array)
    ties = int((magnitude == magnitude.max()).sum())
    assert ties > 8
    assert any(f"{ties} voxels share the map's maximum" in w for w in result.warnings), result.warnings
