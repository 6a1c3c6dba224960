"""Layer methods on TorchScript (issue 15, part 3): eager twins of scripted and traced networks give the same maps as
the eager network of the same weights; a model whose layers cannot be rebuilt is described precisely and refused in
one line; a card may name an architecture only from a package the user's configuration trusts."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from CTXAILib import Explainer, LayerError, MethodError, ModelError, load_model
from CTXAILib.cli import main as ctxai
from CTXAILib.engine.models import sha256_file
from CTXAILib.engine.networks import DefectClassifier3D, UNet3D
from CTXAILib.engine.scripted import GraphModule, eager_twin
from CTXAILib.worker.client import WorkerClient
from ctxai_testing import calibrate_batchnorm, ct_volume

PATCH = [16, 16, 16]
LAYER_METHODS = ("gradcam", "hirescam", "lrp", "deeplift", "guided_backprop")


def _card(folder: Path, name: str, task: str, classes: list[str], weights: Path, architecture: dict | None) -> Path:
    card = {"name": name, "task": task, "class_names": classes, "weights": weights.name, "input_channels": 1,
            "patch_size": PATCH, "spacing_mm": [0.2, 0.2, 0.2], "air_value": -1000,
            "normalization": {"type": "window", "window": [-1000, 4000]}, "output_activation": "softmax",
            "format": "state_dict" if architecture else "torchscript", "sha256": sha256_file(weights)}
    if architecture:
        card["architecture"] = architecture
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card))
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """The bundled classifier's architecture (state_dict, torch.jit.script) and a U-Net (state_dict,
    torch.jit.trace): tiny, with BatchNorm statistics from CT-like patches."""
    folder = tmp_path_factory.mktemp("scripted")
    torch.manual_seed(0)
    params = {"num_classes": 2, "widths": [4, 6, 8, 8]}
    classifier = DefectClassifier3D(**params)
    calibrate_batchnorm(classifier, PATCH)
    unet = UNet3D(out_channels=2, widths=(4, 8))
    calibrate_batchnorm(unet, PATCH)
    paths = {}
    for name, net, task, arch, compiled in (
            ("classifier", classifier, "classification", {"name": "ctxai.DefectClassifier3D", "params": params},
             torch.jit.script(classifier)),
            ("unet", unet, "segmentation", {"name": "ctxai.UNet3D", "params": {"out_channels": 2, "widths": [4, 8]}},
             torch.jit.trace(unet, torch.zeros([1, 1] + PATCH)))):
        classes = ["normal", "pore"] if task == "classification" else ["background", "defect"]
        torch.save(net.state_dict(), folder / f"{name}.pt")
        compiled.save(str(folder / f"{name}_ts.pt"))
        paths[name] = _card(folder, name, task, classes, folder / f"{name}.pt", arch)
        paths[f"{name}_ts"] = _card(folder, f"{name}_ts", task, classes, folder / f"{name}_ts.pt", None)
    return paths


@pytest.fixture(scope="session")
def small_volume():
    return ct_volume(tuple(PATCH))


class Branching(nn.Module):
    """A classifier whose forward decides at run time whether a layer runs: no fixed sequence of layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.extra = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if bool(y.mean() > 0.1):
            y = torch.relu(self.extra(y))
        return self.head(y.mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("name, methods", [("classifier", LAYER_METHODS), ("unet", ("lrp",))])
def test_layer_methods_on_torchscript_equal_the_eager_model(models, small_volume, name, methods):
    # One sample per batch: no batch-size search, which would cost more than these tiny runs.
    eager, compiled = (Explainer(models[key], device="cpu", memory_mb=1) for key in (name, f"{name}_ts"))
    assert compiled.model.is_torchscript and compiled.model.hookable
    assert compiled.model.twin.max_difference == 0.0
    assert "rebuilt from TorchScript" in compiled.model.layer_access()
    # The traced U-Net's skips and concatenation are replayed from its graph; the classifier is a chain.
    assert isinstance(compiled.model.module, GraphModule) == (name == "unet")
    assert compiled.model.default_layer() == eager.model.default_layer()
    for method in methods:
        expected = eager.explain(small_volume, method).attribution.array
        got = compiled.explain(small_volume, method)
        assert np.abs(expected).max() > 0, method
        np.testing.assert_allclose(got.attribution.array, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())
        assert got.layer == (eager.model.default_layer() if method in ("gradcam", "hirescam") else None)


def test_twin_that_differs_is_refused():
    # Control: a module called ReLU that doubles its input; rebuilt as nn.ReLU it would compute something else.
    class ReLU(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    net = nn.Sequential(nn.Conv3d(1, 2, 3), ReLU(), nn.Flatten()).eval()
    twin = eager_twin(torch.jit.script(net), torch.randn(1, 1, 6, 6, 6))
    assert twin.module is None and "differ from the compiled model by up to" in twin.reason


def test_layers_json_on_torchscript(models, capsys):
    assert ctxai(["layers", "--model", str(models["classifier_ts"]), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    layers = {layer["name"]: layer for layer in listing["layers"]}
    assert listing["layer_methods"] and listing["default"] == "features.block4.conv2"
    conv = layers["features.block4.conv2"]
    assert conv["type"] == "Conv3d" and conv["conv"] and conv["cam_usable"]
    assert conv["output_shape"] == [1, 8, 4, 4, 4]  # two poolings of a 16³ patch
    assert layers["classifier"]["output_shape"] == [1, 2] and not layers["classifier"]["conv"]


def test_control_flow_model_gets_the_precise_statement(tmp_path, small_volume, capsys):
    torch.jit.script(Branching().eval()).save(str(tmp_path / "branching.pt"))
    card = _card(tmp_path, "branching", "classification", ["a", "b"], tmp_path / "branching.pt", None)
    model = load_model(card)
    assert not model.hookable and model.default_layer() is None
    statement = model.hook_refusal()
    assert "control flow (prim::If at test_scripted.py:" in statement
    assert "Grad-CAM" in statement and "LRP" in statement and "Integrated Gradients" in statement
    assert ctxai(["layers", "--model", str(card), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["default"] is None and not listing["layer_methods"] and listing["layer_access"] == statement
    convs = {layer["name"]: layer for layer in listing["layers"]}
    assert convs["conv"]["conv"] and convs["conv"]["type"] == "Conv3d" and not convs["head"]["conv"]
    with pytest.raises(LayerError, match="control flow"):
        model.get_layer("conv")
    explainer = Explainer(model, device="cpu")
    with pytest.raises(MethodError, match="Grad-CAM hooks the model's layers. Model 'branching' is TorchScript"):
        explainer.explain(small_volume, "gradcam")
    assert np.abs(explainer.explain(small_volume, "saliency").attribution.array).max() > 0
    volume_file = tmp_path / "v.nrrd"
    from CTXAILib import write_volume
    write_volume(small_volume, volume_file)
    assert ctxai(["explain", "--model", str(card), "--volume", str(volume_file), "--method", "lrp",
                  "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: LRP hooks the model's layers") and "prim::If" in error[0]
    assert not (tmp_path / "out").exists()


def test_worker_describes_which_methods_work(tmp_path, models):
    # What the panel shows: the real worker process describes both TorchScript models.
    torch.jit.script(Branching().eval()).save(str(tmp_path / "branching.pt"))
    card = _card(tmp_path, "branching", "classification", ["a", "b"], tmp_path / "branching.pt", None)
    client = WorkerClient()
    try:
        rebuilt = client.call("describe_model", model=str(models["classifier_ts"]), device="cpu")
        compiled = client.call("describe_model", model=str(card), device="cpu")
    finally:
        client.stop()
    assert rebuilt["torchscript"] and rebuilt["layer_methods"] and rebuilt["default_layer"] == "features.block4.conv2"
    assert compiled["torchscript"] and not compiled["layer_methods"] and compiled["default_layer"] is None
    assert "control flow (prim::If" in compiled["layer_access"] and "Saliency" in compiled["layer_access"]


@pytest.fixture
def lab_package(tmp_path, monkeypatch, models):
    """A package of the user's own (on sys.path for the test) with the classifier's architecture, and a card naming
    it with the classifier's weights; the configuration file starts empty."""
    package = tmp_path / "site" / "ctxai_testlab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        from os import getcwd

        from CTXAILib.engine.networks import DefectClassifier3D


        class LabClassifier(DefectClassifier3D):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CTXAI_CONFIG", str(tmp_path / "config.json"))
    card = json.loads(models["classifier"].read_text())
    card["architecture"]["name"] = "ctxai_testlab.nets.LabClassifier"
    card["weights"] = str(models["classifier"].with_suffix(".pt"))
    (tmp_path / "lab.json").write_text(json.dumps(card))
    return tmp_path / "lab.json"


def test_trusted_package_architecture(lab_package, models):
    config = lab_package.parent / "config.json"
    with pytest.raises(ModelError, match=r"add 'ctxai_testlab.nets' to 'trusted_architectures' in .*config.json"):
        load_model(lab_package)
    # A prefix trusts its submodules only, not a package whose name merely starts the same.
    config.write_text(json.dumps({"trusted_architectures": ["ctxai_test"]}))
    with pytest.raises(ModelError, match="Unknown architecture 'ctxai_testlab.nets.LabClassifier'"):
        load_model(lab_package)
    config.write_text(json.dumps({"trusted_architectures": ["ctxai_testlab"]}))
    model = load_model(lab_package)
    assert type(model.module).__name__ == "LabClassifier"
    expected = load_model(models["classifier"]).module
    probe = torch.randn([2, 1] + PATCH)
    with torch.no_grad():
        torch.testing.assert_close(model.module(probe), expected(probe), rtol=0, atol=0)
    # Only what the trusted package defines: not a function it imported from elsewhere.
    card = json.loads(lab_package.read_text())
    card["architecture"] = {"name": "ctxai_testlab.nets.getcwd"}
    (lab_package.parent / "getcwd.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="is defined in '(posix|nt)', which 'trusted_architectures'"):
        load_model(lab_package.parent / "getcwd.json")
    config.write_text(json.dumps({"trusted_architectures": "ctxai_testlab"}))
    with pytest.raises(ModelError, match="must be a list of Python module names"):
        load_model(lab_package)
