"""The `ctxai` console command as a real subprocess: registry, layers, explain, errors and interruption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from CTXAILib import read_volume

CTXAI = shutil.which("ctxai") or str(Path(sys.executable).with_name("ctxai"))


def run(*args, timeout=300):
    return subprocess.run([CTXAI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_methods_json():
    out = run("methods", "--json")
    assert out.returncode == 0, out.stderr
    registry = {m["name"]: m for m in json.loads(out.stdout)}
    ig = registry["integrated_gradients"]
    assert ig["family"] == "gradient" and ig["sign"] == "attribution" and ig["signed"] and not ig["needs_layer"]
    steps = {s["name"]: s for s in ig["settings"]}["steps"]
    assert steps["type"] == "int" and steps["min"] == 2 and steps["default"] == 32 and steps["help"]
    assert registry["gradcam"]["needs_layer"] and registry["gradcam"]["sign"] == "magnitude"
    assert not registry["gradcam"]["signed"]
    # A gradient's sign is a direction of change, not evidence against the class (issue 10).
    assert registry["guided_backprop"]["sign"] == registry["guided_gradcam"]["sign"] == "sensitivity"
    assert {m["sign"] for m in registry.values()} == {"attribution", "sensitivity", "magnitude"}
    assert registry["confidence"]["segmentation_only"]


def test_layers_json(unet_card):
    out = run("layers", "--model", unet_card, "--json")
    assert out.returncode == 0, out.stderr
    layers = json.loads(out.stdout)
    assert layers["default"] == "decoders.1.conv2"
    head = {layer["name"]: layer for layer in layers["layers"]}["head"]
    assert head["output_shape"] == [1, 2, 32, 32, 32] and head["cam_usable"]


def test_explain_writes_outputs(tmp_path, volume_file, unet_card):
    out = run("explain", "--volume", volume_file, "--model", unet_card, "--method", "integrated_gradients",
              "--set", "steps=8", "--set", "baseline=blurred", "--roi", "8,8,8,24,24,24", "--device", "cpu",
              "--out", tmp_path / "run")
    assert out.returncode == 0, out.stderr
    assert "attribution" in out.stdout and "run.json" in out.stdout
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["method"]["settings"] == {"steps": 8, "baseline": "blurred", "blur_sigma_mm": 2.0,
                                            "integration": "gausslegendre"}
    assert record["outputs"] == {"attribution": "attribution.nrrd", "confidence": "confidence.nrrd"}
    volume = read_volume(volume_file)
    for name in ("attribution.nrrd", "confidence.nrrd"):
        written = read_volume(tmp_path / "run" / name)
        np.testing.assert_allclose(written.ijk_to_ras, volume.ijk_to_ras, atol=1e-12)
    assert record["input"]["ijk_to_ras"] == volume.ijk_to_ras.tolist()


def test_errors_are_one_clear_line(tmp_path, volume_file, classifier_card):
    out = run("explain", "--volume", volume_file, "--model", classifier_card, "--method", "saliency",
              "--target", "porosity", "--out", tmp_path / "run")
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1].startswith("error: Class 'porosity' is not predicted")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    out = run("explain", "--volume", tmp_path / "missing.nrrd", "--model", classifier_card, "--method",
              "saliency", "--out", tmp_path / "run")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = run("explain", "--volume", volume_file, "--model", classifier_card, "--method", "saliency",
              "--roi", "1,2,3", "--out", tmp_path / "run")
    assert out.returncode == 2 and "--roi needs 6 comma-separated integers" in out.stderr


def test_interrupt_leaves_no_partial_output(tmp_path, volume_file, classifier_card):
    out_dir = tmp_path / "run"
    process = subprocess.Popen([CTXAI, "explain", "--volume", str(volume_file), "--model", str(classifier_card),
                                "--method", "integrated_gradients", "--set", "steps=1024", "--memory-mb", "32",
                                "--device", "cpu", "--out", str(out_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4.0)
    assert process.poll() is None, process.communicate()
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "no output was written" in stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())
