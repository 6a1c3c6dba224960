"""`ctxai demo` on a fresh output folder: every promised file, readable, in the CT's geometry, and the heat maps
of the explanations sit on the defects they explain."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from CTXAILib import read_volume

CTXAI = shutil.which("ctxai") or str(Path(sys.executable).with_name("ctxai"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    started = time.perf_counter()
    completed = subprocess.run([CTXAI, "demo", "--out", str(out), "--device", "cpu"], capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, completed.stdout, time.perf_counter() - started


def test_demo_runs_in_time_and_says_what_it_wrote(demo):
    out, stdout, seconds = demo
    assert seconds < 600, f"the demo took {seconds:.0f} s"
    assert f"Outputs in {out}" in stdout and "triplanar.png" in stdout


def test_demo_writes_every_volume_with_the_ct_geometry(demo):
    out, _, _ = demo
    summary = json.loads((out / "summary.json").read_text())
    ct = read_volume(out / "phantom" / "ct.nrrd")
    for name in ("gt_labels.nrrd", "gt_instances.nrrd"):
        assert read_volume(out / "phantom" / name).same_geometry(ct)
    assert (out / "phantom" / "gt_labels.ctbl").read_text().count("\n") >= 6
    for name in ("predicted_labels.nrrd", "confidence_void.nrrd", "confidence_inclusion.nrrd"):
        assert read_volume(out / "segmentation" / name).same_geometry(ct)
    # Both models, two methods each, for every defect class the classifier found.
    classes = {e["target"] for e in summary["explanations"] if e["model"] == "classifier"}
    assert {"pore", "inclusion"} <= classes
    names = [e["name"] for e in summary["explanations"]]
    assert len(set(names)) == len(names) == 4 * len(classes)
    for item in summary["explanations"]:
        files = item["files"]
        attribution = read_volume(files["attribution"])
        assert attribution.same_geometry(ct) and np.isfinite(attribution.array).all()
        record = json.loads(Path(files["record"]).read_text())
        assert record["method"]["name"] == item["method"] and record["input"]["sha256"]
        assert Path(files["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_heat_maps_sit_on_their_defects(demo):
    out, _, _ = demo
    summary = json.loads((out / "summary.json").read_text())
    instances = read_volume(out / "phantom" / "gt_instances.nrrd").array
    for item in summary["explanations"]:
        truth = item["ground_truth"]
        assert truth is not None, f"{item['name']} explains a detection with no real defect"
        attribution = np.abs(read_volume(item["files"]["attribution"]).array)
        defect = np.argwhere(instances == truth["id"])
        # The pointing game: the strongest voxel lies in the defect's box grown by the coarsest map's cell (the
        # classifier's CAM layer works at 1/4 resolution).
        strongest = np.array(np.unravel_index(np.argmax(attribution), attribution.shape))
        assert np.all(strongest >= defect.min(axis=0) - 4) and np.all(strongest <= defect.max(axis=0) + 4), \
            f"{item['name']}: strongest voxel {strongest[::-1]} (i,j,k) is off the defect"
        # And the map is not spread far away: the strongest 1 % lies near the defect.
        top = np.argwhere(attribution >= np.percentile(attribution[attribution > 0], 99))
        sample = defect[:: max(1, len(defect) // 300)]
        distances = np.min(np.linalg.norm(top[:, None, :] - sample[None], axis=2), axis=1)
        assert np.median(distances) <= 8.0, f"{item['name']}: the strongest 1 % lies {np.median(distances):.1f} voxels off"
