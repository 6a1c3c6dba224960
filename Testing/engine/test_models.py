"""Model cards and loading: validation, safe loading, TorchScript with and without a card, layer discovery."""

from __future__ import annotations

import copy
import warnings
import json
import shutil

import pytest
import torch

from CTXAILib import LayerError, ModelCard, ModelError, TargetError, load_model
from CTXAILib.engine.networks import DefectClassifier3D, UNet3D


def test_card_round_trip(classifier_card):
    card = ModelCard.load(classifier_card)
    assert card.task == "classification" and card.patch_shape == (32, 32, 32)
    assert card.class_index("pore") == 1 and card.class_index(2) == 2 and card.class_index("3") == 3
    again = ModelCard.from_dict(card.to_dict(), classifier_card)
    assert again == card


@pytest.mark.parametrize("change, message", [
    ({"task": "detection"}, "'task' must be one of classification, segmentation"),
    ({"class_names": []}, "'class_names' must be a non-empty list"),
    ({"class_names": ["a", "a"]}, "duplicates"),
    ({"patch_size": [32, 32]}, "'patch_size' must be three positive ints"),
    ({"spacing_mm": [0.2, -1, 0.2]}, "'spacing_mm' must be three positive floats"),
    ({"normalization": {"type": "window", "window": [10, 5]}}, "low < high"),
    ({"normalization": {"type": "meanstd", "mean": 0, "std": 0}}, "std"),
    ({"normalization": {"type": "zscore"}}, "must be window, meanstd, minmax, percentile or none"),
    ({"output_activation": "relu"}, "'output_activation' must be one of"),
    ({"format": "onnx"}, "'format' must be one of"),
    ({"architecture": None}, "needs 'architecture'"),
    ({"sha256": "abc"}, "64 hexadecimal digits"),
    ({"input_channels": "1"}, "'input_channels' must be int"),
])
def test_card_errors_name_the_field(classifier_card, change, message):
    data = json.loads(classifier_card.read_text())
    data.update(change)
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        ModelCard.from_dict(data, classifier_card)
    assert str(classifier_card) in str(info.value)


def test_missing_key_and_bad_json(tmp_path, classifier_card):
    data = json.loads(classifier_card.read_text())
    del data["task"]
    with pytest.raises(ModelError, match="has no 'task'"):
        ModelCard.from_dict(data)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(bad)


def test_unknown_class_lists_classes(classifier_card):
    with pytest.raises(TargetError, match="'normal', 'pore', 'crack', 'inclusion'"):
        ModelCard.load(classifier_card).class_index("porosity")


def test_state_dict_loads_and_matches(classifier_card):
    model = load_model(classifier_card)
    assert not model.is_torchscript and not model.module.training
    assert model.sha256 == ModelCard.load(classifier_card).sha256
    out = model(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, 4)


def test_weights_file_finds_card_beside_it(classifier_card):
    model = load_model(classifier_card.with_suffix(".pt"))
    assert model.card.name == "classifier"


def test_sha_mismatch_is_refused(tmp_path, classifier_card):
    shutil.copy(classifier_card.with_suffix(".pt"), tmp_path / "classifier.pt")
    data = json.loads(classifier_card.read_text())
    data["sha256"] = "0" * 64
    (tmp_path / "classifier.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="do not match their model card"):
        load_model(tmp_path / "classifier.json")


def test_corrupt_weights_are_refused(tmp_path, classifier_card):
    data = json.loads(classifier_card.read_text())
    data.pop("sha256")
    (tmp_path / "classifier.json").write_text(json.dumps(data))
    blob = classifier_card.with_suffix(".pt").read_bytes()
    (tmp_path / "classifier.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelError, match="damaged or truncated archive"):
        load_model(tmp_path / "classifier.json")


class Payload:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_untrusted_pickle_is_refused(tmp_path, classifier_card, capsys):
    data = json.loads(classifier_card.read_text())
    data.pop("sha256")
    (tmp_path / "classifier.json").write_text(json.dumps(data))
    state = DefectClassifier3D(widths=(8, 12, 16, 16)).state_dict()
    state["evil"] = Payload()
    torch.save(state, tmp_path / "classifier.pt")
    with pytest.raises(ModelError, match="refused: untrusted code could run"):
        load_model(tmp_path / "classifier.json")
    assert "pickle code ran" not in capsys.readouterr().out


def test_wrong_architecture_params(tmp_path, classifier_card):
    data = json.loads(classifier_card.read_text())
    data.pop("sha256")
    data["architecture"]["params"]["widths"] = [8, 8, 8, 8]
    shutil.copy(classifier_card.with_suffix(".pt"), tmp_path / "classifier.pt")
    (tmp_path / "classifier.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="do not fit architecture ctxai.DefectClassifier3D"):
        load_model(tmp_path / "classifier.json")


def test_unknown_architecture(tmp_path, classifier_card):
    data = json.loads(classifier_card.read_text())
    data["architecture"]["name"] = "os.system"
    shutil.copy(classifier_card.with_suffix(".pt"), tmp_path / "classifier.pt")
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="Unknown architecture 'os.system'"):
        load_model(tmp_path / "c.json")


def test_monai_architecture(tmp_path):
    monai_nets = pytest.importorskip("monai.networks.nets")
    params = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2]}
    torch.save(monai_nets.UNet(**params).state_dict(), tmp_path / "m.pt")
    card = {"name": "monai-unet", "task": "segmentation", "class_names": ["bg", "pore"], "format": "state_dict",
            "weights": "m.pt", "patch_size": [32, 32, 32],
            "architecture": {"name": "monai.networks.nets.UNet", "params": params}}
    (tmp_path / "m.json").write_text(json.dumps(card))
    model = load_model(tmp_path / "m.json")
    assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    assert model.default_layer() is not None
    card["architecture"]["name"] = "monai.networks.nets.NoSuchNet"
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="MONAI has no network class"):
        load_model(tmp_path / "m.json")


def test_torchscript_with_card(tmp_path, classifier_card):
    net = load_model(classifier_card).module
    traced = torch.jit.trace(copy.deepcopy(net), torch.zeros(1, 1, 32, 32, 32))
    traced.save(str(tmp_path / "ts.pt"))
    data = json.loads(classifier_card.read_text())
    data.update(format="torchscript", weights="ts.pt")
    data.pop("sha256")
    (tmp_path / "ts.json").write_text(json.dumps(data))
    model = load_model(tmp_path / "ts.json")
    assert model.is_torchscript
    assert torch.allclose(model(torch.ones(1, 1, 32, 32, 32)), net(torch.ones(1, 1, 32, 32, 32)), atol=1e-5)
    # Its layers are reached through the eager twin, under the original names.
    assert model.hookable and isinstance(model.get_layer("features.block4.conv2"), torch.nn.Conv3d)


def test_bare_torchscript_infers_task_with_warning(tmp_path):
    net = UNet3D(out_channels=3, widths=(4, 8)).eval()
    torch.jit.trace(net, torch.zeros(1, 1, 16, 16, 16)).save(str(tmp_path / "bare.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, as the run's warning line, not also as a Python warning
        model = load_model(tmp_path / "bare.pt")
    assert model.card.task == "segmentation" and model.card.class_names == ["0", "1", "2"]
    assert model.card.normalization.type == "none" and model.card.patch_size is None
    assert len(model.warnings) == 1
    assert "has no model card: assumed a segmentation model with 3 classes" in model.warnings[0]

    classifier = DefectClassifier3D(num_classes=2, widths=(4, 4, 4, 4)).eval()
    torch.jit.trace(classifier, torch.zeros(1, 1, 32, 32, 32)).save(str(tmp_path / "cls.pt"))
    model = load_model(tmp_path / "cls.pt")
    assert model.card.task == "classification" and "classification model with 2 classes" in model.warnings[0]


def test_state_dict_without_card_is_explained(tmp_path, classifier_card):
    shutil.copy(classifier_card.with_suffix(".pt"), tmp_path / "lonely.pt")
    with pytest.raises(ModelError, match="not a TorchScript archive"):
        load_model(tmp_path / "lonely.pt")


def test_missing_files(tmp_path, classifier_card):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.json")
    data = json.loads(classifier_card.read_text())
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="points to weights"):
        load_model(tmp_path / "c.json")


def test_layers_and_default(classifier_card, unet_card):
    model = load_model(classifier_card)
    layers = {info.name: info for info in model.layers()}
    assert layers["features.block4.conv2"].output_shape == (1, 16, 8, 8, 8)  # two poolings: 1/4 resolution
    assert layers["classifier"].output_shape == (1, 4) and not layers["classifier"].spatial
    assert model.default_layer() == "features.block4.conv2"
    unet = load_model(unet_card)
    # The U-Net's last conv is the class head; its default CAM layer is the last feature conv before it.
    assert unet.default_layer() == "decoders.1.conv2"


def test_unknown_layer_suggests(classifier_card):
    with pytest.raises(LayerError, match="Did you mean features.block4.conv2"):
        load_model(classifier_card).get_layer("features.block4.conv3")
