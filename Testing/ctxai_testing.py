"""Helpers shared by the test suites: CT-like volumes and small real models written to disk with their cards.

The models are the project's own architectures with fixed random weights and BatchNorm statistics filled from
CT-like inputs: enough to exercise every code path on CPU in seconds. Tests that need trained behaviour use the
shipped models in Resources/Models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CLASSES = ["normal", "pore", "crack", "inclusion"]


def ct_volume(shape=(32, 32, 32), spacing=(0.2, 0.2, 0.2), seed=0):
    """A metal block (≈3000) in air (≈-1000) with a dark spherical pore at its centre, plus noise."""
    from CTXAILib import Volume

    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    array = np.full(shape, -1000.0, np.float32)
    margin = [max(2, n // 8) for n in shape]
    array[margin[0]:-margin[0], margin[1]:-margin[1], margin[2]:-margin[2]] = 3000.0
    centre = [n / 2 for n in shape]
    r2 = (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2
    array[r2 <= (min(shape) / 8) ** 2] = 200.0
    array += rng.normal(0, 60, shape).astype(np.float32)
    return Volume(array, spacing=spacing, origin=(-3.1, 2.5, 10.0))


def calibrate_batchnorm(net: torch.nn.Module, patch) -> None:
    """Fill BatchNorm running statistics from CT-like inputs, as training would: with fresh statistics a random
    network's activations are tiny and its output barely depends on the input."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for seed in range(3):
            array = ct_volume(tuple(reversed(patch)), seed=seed).array
            net(torch.from_numpy((array + 1000.0) / 5000.0)[None, None])
    net.eval()


def _card(name, task, classes, weights, arch, params, patch):
    return {"name": name, "task": task, "class_names": classes, "format": "state_dict", "weights": weights,
            "input_channels": 1, "patch_size": patch, "spacing_mm": [0.2, 0.2, 0.2],
            "normalization": {"type": "window", "window": [-1000, 4000]}, "air_value": -1000,
            "output_activation": "softmax", "architecture": {"name": arch, "params": params}}


def write_model(folder: Path, name: str, task: str, patch=(32, 32, 32), seed: int = 0) -> Path:
    """Write a state_dict and its card; returns the card path."""
    from CTXAILib.engine.models import sha256_file
    from CTXAILib.engine.networks import build_architecture

    if task == "classification":
        arch, params, classes = "ctxai.DefectClassifier3D", {"num_classes": 4, "widths": [8, 12, 16, 16]}, CLASSES
    else:
        arch, params, classes = "ctxai.UNet3D", {"out_channels": 2, "widths": [4, 8, 16]}, ["background", "defect"]
    torch.manual_seed(seed)
    net = build_architecture(arch, params)
    calibrate_batchnorm(net, patch)
    weights = folder / f"{name}.pt"
    torch.save(net.state_dict(), weights)
    card = _card(name, task, classes, weights.name, arch, params, list(patch))
    card["sha256"] = sha256_file(weights)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card, indent=2))
    return path


def write_torchscript_card(folder: Path, card: Path) -> Path:
    """A TorchScript copy (traced on a 32³ patch) of the model behind ``card``, with its own card; returns it."""
    from CTXAILib import load_model

    net = load_model(card).module
    torch.jit.trace(net, torch.zeros(1, 1, 32, 32, 32)).save(str(folder / "ts.pt"))
    data = json.loads(card.read_text())
    data.update(format="torchscript", weights="ts.pt")
    data.pop("sha256")
    (folder / "ts.json").write_text(json.dumps(data))
    return folder / "ts.json"
