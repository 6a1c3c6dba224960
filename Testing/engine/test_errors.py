"""Each bad input gets its own specific error: what is wrong, where, and how to fix it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from CTXAILib import (Box, BoxRegion, Explainer, InputError, LayerError, LoadedModel, MethodError, ModelCard,
                      ModelError, RegionError, SettingError, Target, TargetError, Volume, VoxelRegion, load_model)
from ctxai_testing import write_torchscript_card


@pytest.fixture(scope="module")
def explainer(classifier_card):
    return Explainer(classifier_card, device="cpu")


@pytest.fixture(scope="module")
def seg_explainer(unet_card):
    return Explainer(unet_card, device="cpu")


def test_wrong_channel_count(explainer, volume):
    two = Volume(np.stack([volume.array, volume.array]), volume.spacing, volume.origin)
    with pytest.raises(InputError, match=r"expects 1 input channel\(s\) but the volume has 2"):
        explainer.explain(two, "saliency")


def test_wrong_dimensions(explainer):
    with pytest.raises(InputError, match="must be a 3-D array"):
        explainer.explain(Volume(np.zeros((4, 4, 4, 4, 4))), "saliency")
    with pytest.raises(InputError, match="Expected a CTXAILib.Volume"):
        explainer.explain(np.zeros((8, 8, 8)), "saliency")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(explainer, volume, bad):
    array = volume.array.copy()
    array[3, 4, 5] = bad
    with pytest.raises(InputError, match=r"1 NaN or infinite voxel\(s\), the first at voxel \(5, 4, 3\)"):
        explainer.explain(volume.with_array(array), "saliency")


def test_unknown_layer(explainer, volume):
    with pytest.raises(LayerError, match="has no layer 'features.block9'"):
        explainer.explain(volume, "gradcam", layer="features.block9")


def test_layer_without_feature_map(explainer, volume):
    with pytest.raises(LayerError, match="not a 3-D feature map"):
        explainer.explain(volume, "gradcam", layer="classifier")


def test_unknown_class(explainer, volume):
    with pytest.raises(TargetError, match="Class 'void' is not predicted by model 'classifier'"):
        explainer.explain(volume, "saliency", Target("void"))
    with pytest.raises(TargetError, match="is the target class itself"):
        explainer.explain(volume, "saliency", Target("pore", contrast="pore"))


def test_empty_roi(seg_explainer, volume):
    with pytest.raises(RegionError, match="is empty"):
        seg_explainer.explain(volume, "saliency", Target(region=BoxRegion(Box((5, 5, 5), (5, 9, 9)))))


def test_roi_outside_volume(seg_explainer, volume):
    with pytest.raises(RegionError, match="lies outside the volume"):
        seg_explainer.explain(volume, "saliency", Target(region=BoxRegion(Box((40, 0, 0), (50, 8, 8)))))
    with pytest.raises(RegionError, match="outside the volume"):
        seg_explainer.explain(volume, "saliency", Target(region=VoxelRegion((1, 2, 99))))


def test_clicked_point_without_defect(seg_explainer, volume):
    from CTXAILib import ComponentRegion

    probabilities = seg_explainer.segmentation_probabilities(seg_explainer.prepare(volume))
    background = np.argwhere(probabilities.argmax(axis=0) == 0)[0][::-1]
    with pytest.raises(RegionError, match="No predicted region of class 'defect' at voxel"):
        seg_explainer.explain(volume, "saliency", Target("defect", region=ComponentRegion(tuple(background))))


class Thresholded(nn.Module):
    """A classifier that outputs hard decisions: no gradient reaches the input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return (self.conv(x) > 0).float().mean(dim=(2, 3, 4))


def test_model_without_gradient(volume):
    # Its outputs are fractions in [0, 1] already: a softmax on them would be refused as a second activation.
    card = ModelCard.from_dict({"name": "hard", "task": "classification", "class_names": ["a", "b"],
                                "format": "torchscript", "weights": "-", "patch_size": [32, 32, 32],
                                "output_activation": "none"})
    explainer = Explainer(LoadedModel(Thresholded(), card, "0" * 64), device="cpu")
    with pytest.raises(MethodError, match="has no gradient with respect to its input"):
        explainer.explain(volume, "integrated_gradients", settings={"steps": 4})
    # Perturbation methods still work on it.
    result = explainer.explain(volume, "occlusion", settings={"window": 16, "stride": 16})
    assert np.isfinite(result.attribution.array).all()


def test_corrupt_model_file(tmp_path, classifier_card):
    data = json.loads(classifier_card.read_text())
    data.pop("sha256")
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "classifier.pt").write_bytes(b"PK\x03\x04 definitely not a model")
    with pytest.raises(ModelError, match="damaged or truncated archive"):
        Explainer(tmp_path / "c.json", device="cpu")
    data.update(format="torchscript")
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="damaged or truncated archive"):
        load_model(tmp_path / "c.json")


def test_unknown_method_and_settings(explainer, volume):
    with pytest.raises(MethodError, match="Unknown method 'gradcamm'. Did you mean gradcam"):
        explainer.explain(volume, "gradcamm")
    with pytest.raises(SettingError, match="Unknown setting\\(s\\) 'step' for integrated_gradients"):
        explainer.explain(volume, "integrated_gradients", settings={"step": 8})
    with pytest.raises(SettingError, match="must lie in \\[2, 1024\\]"):
        explainer.explain(volume, "integrated_gradients", settings={"steps": 1})
    with pytest.raises(SettingError, match="must be one of zeros, air, part_mean, blurred"):
        explainer.explain(volume, "integrated_gradients", settings={"baseline": "black"})
    with pytest.raises(SettingError, match="must be a whole number"):
        explainer.explain(volume, "occlusion", settings={"window": "big"})


def test_torchscript_runs_hook_methods(tmp_path, classifier_card, volume):
    # Through the model's eager twin; a model without one is refused in test_scripted.py.
    explainer = Explainer(write_torchscript_card(tmp_path, classifier_card), device="cpu")
    for method in ("gradcam", "saliency"):
        assert np.abs(explainer.explain(volume, method).attribution.array).max() > 0


def test_bad_device_and_options(classifier_card):
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU is available"):
            Explainer(classifier_card, device="cuda")
    with pytest.raises(InputError, match="Unknown device"):
        Explainer(classifier_card, device="tpu:0")
    with pytest.raises(InputError, match="Unknown precision"):
        Explainer(classifier_card, device="cpu", precision="fp8")
    with pytest.raises(InputError, match="overlap"):
        Explainer(classifier_card, device="cpu", overlap=1.0)


def test_classifier_refuses_mask_region(explainer, volume):
    from CTXAILib import MaskRegion

    with pytest.raises(TargetError, match="not a mask"):
        explainer.explain(volume, "saliency", Target(region=MaskRegion(np.ones(volume.shape, bool))))


def test_mask_of_wrong_shape(seg_explainer, volume):
    from CTXAILib import MaskRegion

    with pytest.raises(RegionError, match="mask has shape \\(4, 4, 4\\)"):
        seg_explainer.explain(volume, "saliency", Target(region=MaskRegion(np.ones((4, 4, 4), bool))))
    with pytest.raises(RegionError, match="mask is empty"):
        seg_explainer.explain(volume, "saliency", Target(region=MaskRegion(np.zeros(volume.shape, bool))))
