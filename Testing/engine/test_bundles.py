"""Bring-your-own models (issue 15, parts 2 and 4): MONAI bundles and factory functions, the minmax and percentile
normalisations, and `ctxai card init`, on real MONAI networks, real files and the real CLI."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from CTXAILib import Explainer, Target, load_model
from CTXAILib.cli import main
from CTXAILib.engine.geometry import Box
from CTXAILib.engine.modelcard import ModelCard, Normalization
from CTXAILib.engine.models import sha256_file
from CTXAILib.engine.networks import UNet3D
from CTXAILib.engine.sliding import crop_padded
from CTXAILib.engine.targets import BoxRegion
from CTXAILib.records.record import run_record
from ctxai_testing import ct_volume

monai_nets = pytest.importorskip("monai.networks.nets")

UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
        "num_res_units": 0}
REGION = BoxRegion(Box((8, 8, 8), (24, 24, 24)))
WINDOW = [-1000, 4000]
SMALL = 1.0  # MiB of activations: one tile per batch, so no batch-size search (seconds on a busy CPU) is run


def _write_bundle(folder: Path, inference: dict, net: torch.nn.Module | None = None) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    metadata = {"name": "tiny-monai-unet", "version": "0.1", "description": "made in the test",
                "network_data_format": {
                    "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [32, 32, 32]}},
                    "outputs": {"pred": {"type": "image", "num_channels": 2,
                                         "channel_def": {"1": "pore", "0": "background"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    if net is not None:
        torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


def _inference(**changes) -> dict:
    config = {
        "device": "$torch.device('cpu')",  # an expression CTXAI never reads: neither run nor refused
        "spatial_dims": 3,
        "network_def": {"_target_": "UNet", **UNET, "spatial_dims": "@spatial_dims"},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [0.2, 0.2, 0.2]},
            "@intensity",
            {"_target_": "ScaleIntensityRanged", "keys": "label", "a_min": 0, "a_max": 1},  # not the image's
            {"_target_": "EnsureTyped", "keys": "image", "device": "@device"}]},
        "intensity": {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": WINDOW[0],
                      "a_max": WINDOW[1], "b_min": 0.0, "b_max": 1.0, "clip": True},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
    }
    config.update(changes)
    return config


@pytest.fixture(scope="session")
def monai_unet() -> torch.nn.Module:
    torch.manual_seed(3)
    return monai_nets.UNet(**UNET).eval()


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, monai_unet) -> Path:
    return _write_bundle(tmp_path_factory.mktemp("bundle") / "tiny_unet", _inference(), monai_unet)


@pytest.fixture(scope="session")
def bundle_twin_card(tmp_path_factory, bundle) -> Path:
    """The same weights behind a hand-written card saying what the bundle says: the reference for its maps."""
    folder = tmp_path_factory.mktemp("twin")
    shutil.copy(bundle / "models" / "model.pt", folder / "model.pt")
    card = {"name": "twin", "task": "segmentation", "class_names": ["background", "pore"], "format": "state_dict",
            "weights": "model.pt", "patch_size": [32, 32, 32], "spacing_mm": [0.2, 0.2, 0.2],
            "normalization": {"type": "window", "window": WINDOW}, "output_activation": "softmax",
            "architecture": {"name": "monai.networks.nets.UNet", "params": UNET}}
    (folder / "twin.json").write_text(json.dumps(card))
    return folder / "twin.json"


def test_bundle_reads_into_a_card(bundle, monai_unet):
    model = load_model(bundle)
    card = model.card
    assert card.task == "segmentation" and card.class_names == ["background", "pore"]  # channel_def, in order
    assert card.patch_size == (32, 32, 32) and card.spacing_mm == (0.2, 0.2, 0.2) and card.input_channels == 1
    assert card.normalization == Normalization("window", window=tuple(map(float, WINDOW)))
    assert card.output_activation == "softmax" and card.format == "state_dict"
    assert card.architecture == {"name": "monai.networks.nets.UNet", "params": UNET}  # @spatial_dims resolved
    assert model.sha256 == sha256_file(bundle / "models" / "model.pt") and not model.warnings
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(model(x), monai_unet(x))


def test_bundle_explains_with_gradcam_and_ig_as_its_card_would(bundle, bundle_twin_card, volume):
    explainer = Explainer(bundle, device="cpu", memory_mb=SMALL)
    # The twin keeps the bundle's measured batch sizes: the comparison costs no second search.
    twin = explainer.variant(load_model(bundle_twin_card))
    x = crop_padded(explainer.prepare(volume).x, Box.whole(volume.shape)).numpy()
    np.testing.assert_array_equal(x, np.clip((volume.array[None, None] + 1000.0) / 5000.0, 0.0, 1.0))
    pore = Target("pore", region=REGION)
    for method, settings in (("gradcam", {}), ("integrated_gradients", {"steps": 4, "baseline": "air"})):
        result = explainer.explain(volume, method, pore, settings=settings)
        reference = twin.explain(volume, method, pore, settings=settings)
        assert result.attribution.same_geometry(volume) and result.layer == reference.layer
        assert np.abs(result.attribution.array).max() > 0
        # Equal but for float32 summation order (batch sizes differ between the two runs).
        scale = np.abs(reference.attribution.array).max()
        np.testing.assert_allclose(result.attribution.array, reference.attribution.array, rtol=1e-4,
                                   atol=1e-5 * scale)
    # The control: the other class's map, which the comparison above must tell apart.
    other = twin.explain(volume, "integrated_gradients", Target("background", region=REGION), settings=settings)
    assert not np.allclose(other.attribution.array, result.attribution.array, rtol=1e-3, atol=0)


def test_bundle_expression_needs_trust(tmp_path, monai_unet, capsys):
    network = {"_target_": "UNet", **UNET, "channels": "$[2 ** 2, 2 ** 3]"}
    folder = _write_bundle(tmp_path / "expr", _inference(network_def=network), monai_unet)
    with pytest.raises(Exception, match=r"network_def::channels.*Python expression.*arbitrary Python.*"
                                        r"--trust-bundle-code"):
        load_model(folder)
    assert main(["layers", "--model", str(folder)]) == 2
    assert "--trust-bundle-code" in capsys.readouterr().err
    trusted = load_model(folder, trust_code=True)
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(trusted(x), monai_unet(x)) and trusted.card.training["monai_bundle"]["trusted_code"]
    assert main(["layers", "--model", str(folder), "--trust-bundle-code"]) == 0


def test_worker_describes_a_bundle_and_trusts_only_when_asked(tmp_path, monai_unet):
    from CTXAILib.worker.client import WorkerClient, WorkerError

    network = {"_target_": "UNet", **UNET, "channels": "$[4, 8]"}
    folder = _write_bundle(tmp_path / "expr", _inference(network_def=network), monai_unet)
    client = WorkerClient()
    try:
        with pytest.raises(WorkerError, match="--trust-bundle-code"):
            client.call("describe_model", model=str(folder), device="cpu")
        described = client.call("describe_model", model=str(folder), device="cpu", trust_bundle_code=True)
        assert described["card"]["class_names"] == ["background", "pore"] and not described["model_reused"]
    finally:
        client.stop()


@pytest.mark.parametrize("transform, expected", [
    ({"_target_": "ScaleIntensityRanged", "a_min": 0, "a_max": 100, "b_min": -1, "b_max": 1},
     {"type": "minmax", "range": [0.0, 100.0], "output": [-1.0, 1.0]}),
    ({"_target_": "monai.transforms.ScaleIntensityd", "minv": 0.0, "maxv": 1.0}, {"type": "minmax"}),
    ({"_target_": "NormalizeIntensityd", "subtrahend": 1200, "divisor": 1500},
     {"type": "meanstd", "mean": 1200.0, "std": 1500.0}),
    ({"_target_": "NormalizeIntensityd", "nonzero": True},
     {"type": "percentile", "percentiles": [0.0, 100.0], "nonzero": True}),
    ({"_target_": "ScaleIntensityRangePercentilesd", "lower": 1, "upper": 99, "b_min": 0, "b_max": 1},
     "ScaleIntensityRangePercentilesd, which can change intensities"),
    ({"_target_": "scripts.MyNormalise"}, "MyNormalise, which can change intensities"),
])
def test_bundle_intensity_transforms(tmp_path, monai_unet, transform, expected):
    folder = _write_bundle(tmp_path / "b", _inference(intensity={**transform, "keys": ["image"]}), monai_unet)
    if isinstance(expected, str):
        with pytest.raises(Exception, match=expected):
            load_model(folder)
    else:
        assert load_model(folder).card.normalization.to_dict() == expected


def test_yaml_bundle_reads_like_json(tmp_path, bundle):
    yaml = pytest.importorskip("yaml")
    folder = tmp_path / bundle.name
    shutil.copytree(bundle, folder)
    config = folder / "configs" / "inference.json"
    (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(json.loads(config.read_text())))
    config.unlink()
    assert load_model(folder).card.to_dict() | {"training": None} == load_model(bundle).card.to_dict() | {
        "training": None}


def test_bundle_torchscript_and_custom_network(tmp_path, monai_unet):
    folder = _write_bundle(tmp_path / "ts", _inference(network_def={"_target_": "scripts.net.MyNet"}))
    with pytest.raises(Exception, match="not a MONAI network"):
        shutil.copy(_write_bundle(tmp_path / "sd", _inference(), monai_unet) / "models" / "model.pt",
                    folder / "models" / "model.pt")
        load_model(folder)
    (folder / "models" / "model.pt").unlink()
    torch.jit.script(copy.deepcopy(monai_unet)).save(str(folder / "models" / "model.ts"))
    model = load_model(folder)  # TorchScript needs no network_def
    assert model.is_torchscript and model.card.format == "torchscript"


def test_monai_factory_function_card(tmp_path, volume):
    params = {"spatial_dims": 3, "n_input_channels": 1, "num_classes": 2, "widen_factor": 0.125,
              "conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": True}
    torch.manual_seed(0)
    net = monai_nets.resnet18(**params).eval()
    torch.save(net.state_dict(), tmp_path / "resnet.pt")
    card = {"name": "resnet18", "task": "classification", "class_names": ["sound", "pore"], "format": "state_dict",
            "weights": "resnet.pt", "patch_size": [16, 16, 16], "normalization": {"type": "window", "window": WINDOW},
            "architecture": {"name": "monai.networks.nets.resnet18", "params": params}}
    (tmp_path / "resnet.json").write_text(json.dumps(card))
    explainer = Explainer(tmp_path / "resnet.json", device="cpu", memory_mb=SMALL)
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(explainer.model(x), net(x))
    target = Target("pore", region=REGION)  # one 16³ patch
    cam = explainer.explain(volume, "gradcam", target)
    ig = explainer.explain(volume, "integrated_gradients", target, settings={"steps": 4, "baseline": "air"})
    assert cam.layer == explainer.model.default_layer() and cam.layer.startswith("layer4")
    assert cam.attribution.same_geometry(volume) and np.ptp(cam.attribution.array) > 0
    # The same numbers as Captum's IG on the network itself, fed the window-normalised patch.
    from captum.attr import IntegratedGradients

    patch = crop_padded(explainer.prepare(volume).x, REGION.box)
    baseline = torch.full_like(patch, explainer.prepare(volume).air)

    def captum(index: int) -> np.ndarray:
        return IntegratedGradients(lambda t: net(t)[:, index]).attribute(patch, baselines=baseline,
                                                                         n_steps=4)[0, 0].numpy()

    mine = ig.attribution.array[REGION.box.slices]
    np.testing.assert_allclose(mine, captum(1), rtol=1e-4, atol=1e-5 * np.abs(mine).max())
    assert not np.allclose(mine, captum(0), rtol=1e-2, atol=0)  # the control: the other class's map
    card["architecture"]["name"] = "monai.networks.nets.get_pretrained_resnet_medicalnet"  # downloads: refused
    (tmp_path / "bad.json").write_text(json.dumps(card))
    with pytest.raises(Exception, match="no network class or network factory function"):
        load_model(tmp_path / "bad.json")


def test_percentile_and_minmax_formulas():
    raw = np.array([0.0, 10.0, 20.0, 30.0, 40.0, 1000.0], np.float32)
    fitted = Normalization("percentile", percentiles=(0.0, 80.0)).fitted(raw)
    clipped = np.clip(raw, 0.0, np.percentile(raw, 80))
    assert fitted.clip == (0.0, float(np.percentile(raw, 80)))
    np.testing.assert_allclose(fitted.apply(raw), (clipped - clipped.mean()) / clipped.std(), rtol=1e-6)
    given = Normalization("percentile", percentiles=(0.0, 80.0), mean=5.0, std=2.0).apply(raw)
    np.testing.assert_allclose(given, (clipped - 5.0) / 2.0, rtol=1e-6)
    nonzero = Normalization("percentile", percentiles=(0.0, 100.0), nonzero=True).apply(raw)
    values = raw[1:]
    assert nonzero[0] == 0.0
    np.testing.assert_allclose(nonzero[1:], (values - values.mean()) / values.std(), rtol=1e-6)
    np.testing.assert_allclose(Normalization("minmax").apply(raw), raw / 1000.0, rtol=1e-6)
    np.testing.assert_allclose(Normalization("minmax", range=(0.0, 20.0), output=(-1.0, 1.0)).apply(raw),
                               raw / 10.0 - 1.0, rtol=1e-6)
    card = ModelCard.from_dict({"name": "m", "task": "segmentation", "class_names": ["a"], "format": "torchscript",
                                "weights": "m.pt", "normalization": {"type": "percentile", "percentiles": [1, 99],
                                                                     "nonzero": True}})
    assert card.to_dict()["normalization"] == {"type": "percentile", "percentiles": [1.0, 99.0], "nonzero": True}


@pytest.fixture(scope="session")
def sigmoid_unet_ts(tmp_path_factory) -> Path:
    """A 1-channel sigmoid U-Net as TorchScript, with a card normalising min-max per volume."""
    folder = tmp_path_factory.mktemp("ts_unet")
    torch.manual_seed(1)
    torch.jit.trace(UNet3D(out_channels=1, widths=(4, 8)).eval(), torch.zeros(1, 1, 12, 12, 12)).save(
        str(folder / "unet.ts"))
    card = {"name": "sigmoid-unet", "task": "segmentation", "class_names": ["pore"], "format": "torchscript",
            "weights": "unet.ts", "patch_size": [12, 12, 12], "normalization": {"type": "minmax"},
            "output_activation": "sigmoid"}
    (folder / "unet.json").write_text(json.dumps(card))
    return folder / "unet.json"


def test_minmax_explains_torchscript_unet_with_one_statistic_per_volume(sigmoid_unet_ts):
    volume = ct_volume((16, 16, 16))  # two 12³ tiles along each axis
    # A region inside the first tile: its map depends on that tile's normalisation, per volume or per tile.
    target, settings = Target("pore", region=BoxRegion(Box((1, 1, 1), (4, 4, 4)))), {"steps": 4}
    explainer = Explainer(sigmoid_unet_ts, device="cpu", memory_mb=SMALL)
    result = explainer.explain(volume, "integrated_gradients", target, settings=settings)
    lo, hi = float(volume.array.min()), float(volume.array.max())
    assert result.normalization["range"] == [lo, hi] and "once" in result.normalization["per_volume"]
    assert run_record(result, volume, explainer.model)["input"]["normalization"] == result.normalization
    assert result.attribution.same_geometry(volume) and np.abs(result.attribution.array).max() > 0
    card = json.loads(sigmoid_unet_ts.read_text())

    def with_range(name: str, value: list[float]) -> Explainer:
        path = sigmoid_unet_ts.with_name(name)
        path.write_text(json.dumps({**card, "normalization": {"type": "minmax", "range": value}}))
        return explainer.variant(load_model(path))

    # The map equals the one with the volume's range written in the card: every tile and every IG step was
    # normalised with the whole volume's numbers, not its own.
    fixed = with_range("fixed.json", [lo, hi]).explain(volume, "integrated_gradients", target, settings=settings)
    assert "per_volume" not in fixed.normalization
    np.testing.assert_allclose(result.attribution.array, fixed.attribution.array, rtol=1e-4,
                               atol=1e-5 * np.abs(fixed.attribution.array).max())
    # The control: the range of one tile's voxels (what a per-tile statistic would use) gives another map.
    corner = volume.array[:12, :12, :12]
    tile = with_range("tile.json", [float(corner.min()), float(corner.max())]).explain(
        volume, "integrated_gradients", target, settings=settings)
    assert not np.allclose(tile.attribution.array, result.attribution.array, rtol=1e-3, atol=0)


def test_card_init_writes_a_card_that_loads(tmp_path, volume):
    torch.manual_seed(2)
    net = UNet3D(out_channels=2, widths=(4, 8)).eval()
    torch.save(net.state_dict(), tmp_path / "unet.pt")
    common = ["card", "init", tmp_path / "unet.pt", "--task", "segmentation", "--patch", "16,16,16",
              "--spacing", "0.2,0.2,0.2", "--normalization", "percentile:0.5,99.5", "--activation", "softmax",
              "--architecture", "ctxai.UNet3D", "--params", '{"out_channels": 2, "widths": [4, 8]}']
    out = subprocess.run([sys.executable, "-m", "CTXAILib.cli", *map(str, common), "--classes", "background,pore",
                          "--out", tmp_path / "unet.json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(1, 2, 16, 16, 16)" in out.stdout and "CAM layer    decoders.0.conv2 (inferred" in out.stdout
    model = load_model(tmp_path / "unet.json")
    assert model.card.sha256 == sha256_file(tmp_path / "unet.pt") and model.card.patch_size == (16, 16, 16)
    assert model.card.normalization.to_dict() == {"type": "percentile", "percentiles": [0.5, 99.5]}
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(model(x), net(x))
    # A class count that does not match the output channels: refused in one line, no card written.
    assert main([*map(str, common), "--classes", "a,b,c", "--out", str(tmp_path / "wrong.json")]) == 2
    assert not (tmp_path / "wrong.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.json", "unet.pt"]
