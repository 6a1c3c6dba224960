"""Incremental occlusion gives the exhaustive map (Captum's Occlusion over full passes) on every kind of network it
follows: the trained classifier, a U-Net over several padded sliding-window tiles, a MONAI U-Net with instance
normalisation (run on whole maps, and said so), and a TorchScript model (followed through its eager twin; a bare
compiled module is refused)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from CTXAILib import Box, BoxRegion, Explainer, SettingError, Target, load_model
from CTXAILib.synthetic.evaluation import bundled_model
from CTXAILib.engine.incremental import IncrementalOcclusion, Unsupported, window_boxes
from CTXAILib.engine.models import sha256_file
from CTXAILib.errors import Cancelled
from ctxai_testing import calibrate_batchnorm, ct_volume, write_torchscript_card


def both(explainer, volume, target, **settings):
    maps = {}
    for engine in ("exhaustive", "incremental"):
        result = explainer.explain(volume, "occlusion", target, settings=dict(settings, engine=engine))
        maps[engine] = result
    return maps["exhaustive"], maps["incremental"]


def assert_same_map(exhaustive, incremental):
    a, b = exhaustive.attribution.array, incremental.attribution.array
    spread = float(a.max() - a.min())
    assert spread > 0
    assert np.abs(a - b).max() <= 1e-4 * spread
    assert incremental.extent == exhaustive.extent


def test_windows_follow_captum():
    lo, hi = window_boxes((11, 8, 8), window=4, stride=3)
    # Captum's ceil((n - w) / s) + 1 starts per axis, the last window clipped at the edge:
    # 0, 3, 6, 9 along 11 (the last 2 wide); 0, 3, 6 along 8 (the last 2 wide).
    assert len(lo) == 4 * 3 * 3
    assert sorted(set(lo[:, 0].tolist())) == [0, 3, 6, 9] and sorted(set(lo[:, 1].tolist())) == [0, 3, 6]
    assert hi.max(axis=0).tolist() == [11, 8, 8] and set((hi - lo)[:, 0].tolist()) == {4, 2}


def test_trained_classifier_matches_exhaustive():
    explainer = Explainer(bundled_model("classifier"), device="cpu")
    volume = ct_volume((40, 40, 40), seed=3)
    target = Target("pore", region=BoxRegion(Box((4, 4, 4), (36, 36, 36))))
    exhaustive, incremental = both(explainer, volume, target, window=8, stride=4)
    assert_same_map(exhaustive, incremental)
    assert not any("occlusion" in w.lower() for w in incremental.warnings)


def test_unet_over_padded_tiles_matches_exhaustive(unet_card):
    # 20 voxels along k with a 32^3 patch: every tile is padded there; several tiles along i and j.
    volume = ct_volume((20, 40, 36), seed=5)
    explainer = Explainer(unet_card, device="cpu", min_tile_share=0.0)
    target = Target("defect", region=BoxRegion(Box((10, 12, 4), (30, 30, 16))))
    exhaustive, incremental = both(explainer, volume, target, window=8, stride=7)
    assert len(explainer._plan(volume.shape, target.resolve(explainer.model.card, volume.shape)).tiles) > 1
    assert_same_map(exhaustive, incremental)


def _monai_card(tmp_path, norm):
    from monai.networks.nets import UNet

    params = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
              "num_res_units": 1, "norm": norm}
    torch.manual_seed(0)
    net = UNet(**params)
    calibrate_batchnorm(net, (16, 16, 16))
    torch.save(net.state_dict(), tmp_path / "monai.pt")
    card = {"name": "monai-unet", "task": "segmentation", "class_names": ["background", "defect"],
            "format": "state_dict", "weights": "monai.pt", "sha256": sha256_file(tmp_path / "monai.pt"),
            "input_channels": 1, "patch_size": [16, 16, 16],
            "normalization": {"type": "window", "window": [-1000, 4000]}, "output_activation": "softmax",
            "architecture": {"name": "monai.networks.nets.UNet", "params": params}}
    (tmp_path / "monai.json").write_text(json.dumps(card))
    return tmp_path / "monai.json"


@pytest.mark.parametrize("norm", ["BATCH", "INSTANCE"])
def test_monai_unet_matches_exhaustive(tmp_path, norm):
    explainer = Explainer(_monai_card(tmp_path, norm), device="cpu")
    volume = ct_volume((16, 16, 16), seed=2)
    target = Target("defect", region=BoxRegion(Box((4, 4, 4), (12, 12, 12))))
    exhaustive, incremental = both(explainer, volume, target, window=4, stride=4)
    assert_same_map(exhaustive, incremental)
    whole_map = [w for w in incremental.warnings if "on the whole feature map" in w]
    # Instance normalisation mixes the whole map: exact, but run in full and reported; batch norm is followed.
    assert bool(whole_map) == (norm == "INSTANCE")


def test_torchscript_is_followed_through_its_eager_twin(tmp_path, classifier_card):
    card = write_torchscript_card(tmp_path, classifier_card)
    with pytest.raises(Unsupported, match="TorchScript"):
        IncrementalOcclusion(torch.jit.load(str(tmp_path / "ts.pt")))
    volume = ct_volume((32, 32, 32))
    explainer = Explainer(card, device="cpu")
    assert explainer.model.is_torchscript and explainer.model.hookable
    exhaustive, incremental = both(explainer, volume, None, window=8, stride=8)
    assert not any("cannot follow this model" in w for w in incremental.warnings)
    assert_same_map(exhaustive, incremental)


def test_untraceable_forward_is_reported():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x.mean() if x.sum() > 0 else -x.mean()

    with pytest.raises(Unsupported, match="cannot trace"):
        IncrementalOcclusion(DataDependent().eval())


def test_stride_larger_than_window_is_refused(classifier_card):
    explainer = Explainer(classifier_card, device="cpu")
    with pytest.raises(SettingError, match="stride 6 is larger than its window 4"):
        explainer.explain(ct_volume(), "occlusion", settings={"window": 4, "stride": 6})


def test_progress_and_cancel(classifier_card):
    explainer = Explainer(classifier_card, device="cpu", memory_mb=4)
    volume = ct_volume((24, 24, 24))
    seen = []
    result = explainer.explain(volume, "occlusion", settings={"window": 4, "stride": 4}, progress=seen.append)
    assert result.attribution.same_geometry(volume)  # smaller than the 32^3 patch: the padding is cut off
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("Occlusion" in p.message for p in seen)

    token = threading.Event()
    calls = []

    def cancel_after_first(progress):
        calls.append(progress.fraction)
        if progress.fraction > 0.05:
            token.set()

    with pytest.raises(Cancelled):
        explainer.explain(volume, "occlusion", settings={"window": 4, "stride": 4}, progress=cancel_after_first,
                          cancel=token)
    assert max(calls) < 0.5
