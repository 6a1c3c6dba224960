"""Models that run but do not fit CTXAI (2-D, wrong task in the card, NaN output): one line naming the cause."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from conftest import ctxai, one_error_line


class NaNClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2)

    def forward(self, x):
        return self.head(x.mean(dim=(2, 3, 4))) * float("nan")


def explain(tmp_path, volume_file, model, method="saliency"):
    return ctxai("explain", "--volume", volume_file, "--model", model, "--method", method, "--device", "cpu",
                 "--quiet", "--out", tmp_path / "out")


def test_weak_nan_model_output_says_the_model_returns_nan_and_where(tmp_path, volume_file):
    torch.jit.script(NaNClassifier()).save(str(tmp_path / "nan.pt"))
    line = one_error_line(explain(tmp_path, volume_file, tmp_path / "nan.pt"), "returns NaN or Inf", "IJK")
    assert "try fp32" not in line


@pytest.mark.parametrize("with_card", [False, True])
def test_weak_2d_model_is_named_as_such(tmp_path, volume_file, with_card):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    torch.jit.trace(net, torch.zeros(1, 1, 32, 32)).save(str(tmp_path / "flat.pt"))
    if with_card:
        (tmp_path / "flat.json").write_text(json.dumps({
            "name": "flat", "task": "classification", "class_names": ["a", "b"], "format": "torchscript",
            "weights": "flat.pt", "input_channels": 1, "patch_size": [32, 32, 32]}))
    one_error_line(explain(tmp_path, volume_file, tmp_path / "flat.pt"), "expects 2-D input (N, C, H, W)")


def test_weak_card_with_the_wrong_task_says_the_output_shape_does_not_fit(tmp_path, volume_file, classifier_card):
    card = json.loads(classifier_card.read_text())
    card["task"] = "segmentation"
    shutil.copy(classifier_card.with_suffix(".pt"), tmp_path / card["weights"])
    (tmp_path / "wrong.json").write_text(json.dumps(card))
    one_error_line(explain(tmp_path, volume_file, tmp_path / "wrong.json"), "does not fit the task 'segmentation'")


def test_weak_gradcam_on_a_1x1x1_layer_is_refused(tmp_path, volume_file, classifier_card):
    out = ctxai("explain", "--volume", volume_file, "--model", classifier_card, "--method", "gradcam", "--layer",
                "pool", "--device", "cpu", "--quiet", "--out", tmp_path / "out")
    one_error_line(out, "'pool'", "no spatial extent")


def test_weak_ig_baseline_equal_to_the_input_is_warned(tmp_path, volume, classifier_card):
    from CTXAILib import Volume, write_volume

    flat = write_volume(Volume(volume.array * 0, volume.spacing, volume.origin), tmp_path / "zeros.nrrd")
    out = explain(tmp_path, flat, classifier_card, method="integrated_gradients")
    assert out.returncode == 0, out.stderr
    assert "warning: The part mean baseline equals the input" in out.stderr
