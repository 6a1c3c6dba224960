"""`ctxai verify`: a CPU run is reproduced bit for bit from its record; a changed model file is named before any
computing; the comparison itself fails on a map one ulp away."""

from __future__ import annotations

import json
import shutil
import signal

import numpy as np
import torch

from CTXAILib import read_volume
from CTXAILib.records.reproduce import Reproduction, _compare, differences

from records_testing import ctxai


def test_the_record_holds_what_a_rerun_needs(recorded_run):
    record = json.loads((recorded_run["run"] / "run.json").read_text())
    assert record["sources"]["volume"]["path"] == str(recorded_run["volume"])
    assert record["sources"]["reference_mask"]["path"] == str(recorded_run["mask"])
    assert record["target"]["region_spec"] == {"type": "box", "lo": [7, 17, 10], "hi": [14, 24, 17]}
    assert record["seed"] == 0 and record["output"] == "full" and record["precision"] == "fp32"
    assert set(record["window"]) == {"overlap", "blend", "halo", "min_tile_share", "memory_mb", "tiles",
                                     "predicted_ijk"}
    assert record["window"]["memory_mb"] > 0


def test_a_cpu_run_is_reproduced_bit_for_bit_and_a_changed_model_is_named(recorded_run, capsys):
    from CTXAILib.cli import main

    out = ctxai("verify", recorded_run["run"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "REPRODUCED bit for bit on cpu" in out.stdout and "attribution max |diff| 0," in out.stdout
    weights = recorded_run["model"]
    kept = weights.with_name("unet.pt.kept")
    shutil.copy(weights, kept)
    try:
        state = torch.load(weights, weights_only=True)
        first = next(iter(state))
        state[first] = state[first] + 1e-3
        torch.save(state, weights)
        capsys.readouterr()
        handler = signal.getsignal(signal.SIGTERM)  # main() installs its own: pytest's process keeps its
        try:
            assert main(["verify", str(recorded_run["run"])]) == 2  # named from the hashes: nothing is re-run
        finally:
            signal.signal(signal.SIGTERM, handler)
        printed = capsys.readouterr().out
        assert f"model differs: model weights {weights} changed" in printed
        assert "NOT REPRODUCIBLE: the model differ" in printed and "input differs" not in printed
    finally:
        shutil.move(kept, weights)


def test_versions_and_settings_that_changed_are_named(recorded_run):
    record = json.loads((recorded_run["run"] / "run.json").read_text())
    assert differences(record) == {}  # the control: nothing changed since the run
    record["versions"]["torch"] = "1.0.0"
    record["method"]["settings"]["window_mm"] = 3.0  # a setting saliency no longer knows
    found = differences(record)
    assert found["versions"] == [f"torch 1.0.0 when recorded, {torch.__version__} now"]
    assert "saliency" in found["settings"][0] and set(found) == {"versions", "settings"}


def test_the_comparison_fails_on_a_map_one_ulp_away(recorded_run):
    recorded = read_volume(recorded_run["run"] / "attribution.nrrd")
    assert recorded.array.dtype == np.float32 and np.abs(recorded.array).max() > 0
    result = Reproduction(recorded_run["run"])
    _compare("attribution", recorded, recorded.with_array(recorded.array.copy()), 0.0, result)
    assert result.outputs == {"attribution": 0.0} and not result.mismatches
    nudged = recorded.array.copy()
    index = np.unravel_index(np.argmax(np.abs(nudged)), nudged.shape)
    nudged[index] = np.nextafter(nudged[index], np.float32(np.inf))
    _compare("attribution", recorded, recorded.with_array(nudged), 0.0, result)
    assert result.mismatches and "bit-identical" in result.mismatches[0]
    result = Reproduction(recorded_run["run"])  # the stated tolerance of a GPU run lets that ulp pass
    _compare("attribution", recorded, recorded.with_array(nudged), 1e-3, result)
    assert not result.mismatches
