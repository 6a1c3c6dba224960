"""`ctxai bench --quick` as a real subprocess: the report's machine, rows, ratios and criteria, the printed table,
and a clear error for an unknown case. Speed itself is judged by the full benchmark, never by a test."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from CTXAILib.bench import plan_cases


def bench(*args, tmp_dir=None):
    env = dict(os.environ)
    if tmp_dir is not None:
        env["TMPDIR"] = str(tmp_dir)  # the bench's private folder (phantoms, cards, child results) goes here
    return subprocess.run([sys.executable, "-m", "CTXAILib.cli", "bench", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_reports_every_case(tmp_path):
    out_dir, tmp_dir = tmp_path / "results", tmp_path / "tmp"
    tmp_dir.mkdir()
    out = bench("--quick", "--out", out_dir / "bench.json", tmp_dir=tmp_dir)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in out_dir.iterdir()] == ["bench.json"]  # written atomically: no temporary left beside it
    assert not any(tmp_dir.iterdir())                              # the private folder is removed
    report = json.loads((out_dir / "bench.json").read_text())

    machine = report["machine"]
    for key in ("cpu", "cores", "ram_gib", "os", "python", "device", "device_name", "precision", "threads", "date"):
        assert machine[key], key
    assert {"torch", "captum", "monai", "numpy"} <= set(machine["versions"])

    device_type = "cuda" if machine["device"].startswith("cuda") else "cpu"
    expected = [row for case in plan_cases(device_type, quick=True)[0] for row in case.rows]
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == expected
    for name, row in rows.items():
        engine, limit = row["engine"], row["limit"]
        for measure in (engine, limit):
            assert measure["times_s"] and all(positive(t) for t in measure["times_s"]), name
            assert measure["median_s"] == statistics.median(measure["times_s"])
        assert positive(engine["peak_rss_mib"]) and positive(row["references_peak_rss_mib"])
        assert row["ratios"]["engine_over_limit"] == pytest.approx(engine["median_s"] / limit["median_s"])
        for key in ("captum", "monai"):
            reference, ratio = row[key], row["ratios"][f"engine_over_{key}"]
            if "skipped" in reference:
                assert reference["skipped"] and ratio is None
            else:
                assert all(positive(t) for t in reference["times_s"]) and reference["call"]
                assert ratio == pytest.approx(engine["median_s"] / reference["median_s"])
        assert name in out.stdout
    assert rows["classifier-gradcam"]["captum"]["call"].startswith("LayerGradCam")
    assert "Integrated Gradients" in rows["classifier-integrated_gradients"]["monai"]["skipped"]
    check = rows["occlusion-incremental"]["map_check"]
    assert check["against"] == "occlusion-exhaustive" and check["max_abs_difference_over_range"] <= 1e-4

    assert report["criteria"]
    for criterion in report["criteria"]:
        assert {"criterion", "value", "relation", "bound", "pass"} <= set(criterion)
        assert criterion["pass"] in (True, False, None)
        assert (criterion["value"] is None) == (criterion["pass"] is None)
    assert "engine s" in out.stdout and "×Captum" in out.stdout and "criteria" in out.stdout


def test_unknown_case_names_the_available_ones(tmp_path):
    out = bench("--quick", "--cases", "nonexistent", "--out", tmp_path / "bench.json")
    assert out.returncode == 2
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("error: No benchmark case matches 'nonexistent'")
    assert "classifier-gradcam" in message and "occlusion-incremental" in message and "nnunet-cam" in message
    assert "Traceback" not in out.stderr and not (tmp_path / "bench.json").exists()


def _memory_rows(samples_roi=(3, 3), peaks=(700.0, 1210.0, 1000.0, 2700.0)):
    def row(name, size, peak, samples):
        return {"name": name, "volume_mib": size ** 3 * 4 / 2 ** 20,
                "engine": {"peak_rss_mib": peak, "cold_run_model_samples": samples}}

    return {"memory-roi128": row("memory-roi128", 128, peaks[0], samples_roi[0]),
            "memory-roi512": row("memory-roi512", 512, peaks[1], samples_roi[1]),
            "memory-whole128": row("memory-whole128", 128, peaks[2], 55),
            "memory-whole512": row("memory-whole512", 512, peaks[3], 1027)}


def test_memory_criteria_judge_the_part_and_refuse_runs_that_did_different_model_work():
    """The part's memory is the large run's peak beyond the small one's; that difference means nothing when the
    ROI runs did different model work (as when the 128³ run had 125 tiles and the 512³ one a single tile: the old
    case "passed" with -0.33 volumes)."""
    from CTXAILib.bench.run import _criteria, _memory_scaling

    def verdicts(rows):
        criteria = _criteria(rows, [], False, _memory_scaling(rows))
        return [c for c in criteria if "part: peak RSS" in c["criterion"]]

    roi, whole = verdicts(_memory_rows())
    assert roi["pass"] is True and roi["value"] == pytest.approx(510 / 512)
    assert whole["pass"] is True and whole["value"] == pytest.approx(1700 / 512)
    roi, whole = verdicts(_memory_rows(peaks=(700.0, 1700.0, 1000.0, 3000.0)))  # 2 and 3.9 volumes beyond
    assert roi["pass"] is False and whole["pass"] is False
    roi, _ = verdicts(_memory_rows(samples_roi=(125, 3), peaks=(1400.0, 1260.0, 1000.0, 2700.0)))
    assert roi["pass"] is None and roi["value"] is None and "not comparable" in roi["note"]
