"""``ctxai batch`` on real parts: phantoms, the bundled U-Net, real worker processes, a real local Ray.

One folder of four held-out phantom parts (NRRD files, a DICOM series, a TIFF stack) and a corrupt file is
explained with the policy "confidence < 0.9 plus a 25 % sample": by the CLI in a subprocess that is SIGKILLed after
its first finished item and then run again, and by a local Ray. Both must give the same table, the second run must not recompute what the first finished, and the
corrupt file must be one failed row with its reason.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from CTXAILib.batch.engines import import_ray
from CTXAILib.batch.policy import Policy
from CTXAILib.batch.run import ROW_KEYS, run_batch
from CTXAILib.errors import InputError, OutputError
from CTXAILib.synthetic.evaluation import bundled_model

SEEDS = (900_501, 900_502, 900_503, 900_505)  # held out; few regions, so that few are explained
POLICY = "confidence<0.9+sample=25%"
ARGS = {"policy": POLICY, "methods": ["saliency"], "checks": ["spill"], "min_voxels": 3}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> Path:
    from CTXAILib import Volume, write_volume
    from CTXAILib.synthetic.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("parts")
    formats = {1: "dicom", 2: "tiff"}  # part1 is a DICOM series folder, part2 a folder of TIFF slices
    for n, seed in enumerate(SEEDS):
        ct = generate_phantom(seed, (64, 64, 64), defect_counts={"pore": 2, "inclusion_dense": 1}).ct
        if formats.get(n) == "tiff":  # a TIFF stack has no origin or axes: the reader's are LPS from voxel 0
            ct = Volume(ct.array, ct.spacing, directions=np.diag([-1.0, -1.0, 1.0]))
        write_volume(ct, folder / (f"part{n}" if n in formats else f"part{n}.nrrd"), format=formats.get(n))
    # A truncated NRRD: its header promises 64³ floats, the data is missing.
    (folder / "corrupt.nrrd").write_bytes((folder / "part0.nrrd").read_bytes()[:400])
    return folder


def _cli(parts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "CTXAILib.cli", "batch", "--model", str(bundled_model("unet")), "--inputs",
            str(parts), "--out", str(out), "--policy", POLICY, "--methods", "saliency", "--checks", "spill",
            "--min-voxels", "3", "--workers", "1", "--quiet"]


def _finished(out: Path) -> dict[str, tuple[int, str]]:
    """Run folders with a record: their run.json's mtime and creation time."""
    return {str(p.parent.relative_to(out)): (p.stat().st_mtime_ns, json.loads(p.read_text())["created"])
            for p in out.glob("*/*/run.json")}


def _predictions(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/prediction.json")}


@pytest.fixture(scope="session")
def local_batch(parts, tmp_path_factory):
    """The CLI killed (SIGKILL, its workers too) after its first finished item, then run again to the end."""
    out = tmp_path_factory.mktemp("local") / "batch"
    env = dict(os.environ, PYTHONPATH=str(REPO / "CTXAI"))
    first = subprocess.Popen(_cli(parts, out), env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not _finished(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    before, predicted = _finished(out), _predictions(out)
    second = subprocess.run(_cli(parts, out), env=env, capture_output=True, text=True, timeout=300)
    return out, before, second, predicted


def test_policy_sample_is_seeded_per_region_whatever_the_order():
    policy = Policy.parse(POLICY, seed=3)
    regions = [(f"{n:064x}", r) for n in range(400) for r in range(1, 6)]
    picked = {region for region in regions if policy.sampled(*region)}
    shuffled = regions[:]
    random.Random(1).shuffle(shuffled)
    assert {region for region in shuffled if policy.sampled(*region)} == picked
    assert 0.22 < len(picked) / len(regions) < 0.28
    # Control: another seed takes about as many regions, but not the same ones.
    other = {region for region in regions if Policy.parse(POLICY, seed=4).sampled(*region)}
    assert 0.22 < len(other) / len(regions) < 0.28 and len(other & picked) < 0.4 * len(picked)
    assert policy.select(0.5, *regions[0]) == "low_confidence"
    assert Policy.parse("all").select(1.0, *regions[0]) == "all"
    with pytest.raises(InputError, match=r"--policy term 'confidence<2' is not understood.*sample=P%"):
        Policy.parse("confidence<2+sample=10%")


def test_killed_batch_resumes_without_recomputing(local_batch):
    out, before, second, predicted = local_batch
    assert second.returncode == 0, second.stderr
    # Every scan was predicted before the first item ran: the second run reuses the predictions too.
    assert sorted(predicted) == [f"part{n}" for n in range(4)] and _predictions(out) == predicted
    batch = json.loads((out / "batch.json").read_text())
    after = _finished(out)
    done = [r for r in batch["rows"] if r["status"] == "done"]
    assert 1 <= len(before) < len(done), "the kill must come after the first item and before the last"
    assert {k: after[k] for k in before} == before, "finished run folders were written again"
    assert batch["counts"]["reused"] == len(before) and batch["counts"]["done"] == len(done) == len(after)
    assert not list(out.rglob(".ctxai-partial-*")), "a staging folder of the killed run was left behind"
    assert "failed: corrupt:" in second.stderr and f"{len(done)} of {len(done)} item(s) explained" in second.stdout


def test_table_follows_the_policy_and_the_runs(local_batch, parts):
    out = local_batch[0]
    batch = json.loads((out / "batch.json").read_text())
    assert batch["format"] == "ctxai-batch/1" and batch["policy"]["seed"] == 0
    rows = batch["rows"]
    assert all(list(r) == list(ROW_KEYS) for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["part_id"] for r in failed] == ["corrupt"] and "\n" not in failed[0]["error"]
    assert "corrupt.nrrd" in failed[0]["error"]
    regions = [r for r in rows if r["status"] != "failed"]
    assert {r["part_id"] for r in regions} == {f"part{n}" for n in range(4)} and len(regions) >= 6
    rule = Policy.parse(POLICY, 0)
    for row in regions:
        expected = rule.select(row["mean_confidence"], row["input_sha256"], row["defect_id"])
        assert row["selected_by"] == expected and row["voxels"] >= 3
        assert row["status"] == ("not_selected" if expected is None else "done")
    assert {r["selected_by"] for r in regions} == {None, "low_confidence", "sample"}
    for row in (r for r in regions if r["status"] == "done"):
        record = json.loads((out / row["run_dir"] / "run.json").read_text())
        assert {p.name for p in (out / row["run_dir"]).iterdir()} == {"run.json", "attribution.nrrd",
                                                                      "confidence.nrrd"}
        # The run explained the very region the table lists, as `ctxai explain --point` would have.
        assert record["prediction"]["region_voxels"] == row["voxels"] and record["target"]["class"] == row["class"]
        assert record["input"]["sha256"] == row["input_sha256"] and record["batch"]["selected_by"] == row["selected_by"]
        assert row["checks"] == {"spill": record["checks"]["spill"]["pass"]}
        assert row["verdict"] == record["verdict"]["verdict"]
    csv_lines = (out / "batch.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(ROW_KEYS) and len(csv_lines) == len(rows) + 1


def test_the_batch_audit_log_verifies(local_batch):
    from CTXAILib.records.audit import verify_log

    out = local_batch[0]
    done = [r for r in json.loads((out / "batch.json").read_text())["rows"] if r["status"] == "done"]
    check = verify_log(out / "ctxai-audit.jsonl")
    # One entry per explained item, across the kill: a reused run is not logged twice.
    assert check.intact and check.entries == len(done) and check.files_checked == 3 * len(done), check
    entries = [json.loads(line) for line in (out / "ctxai-audit.jsonl").read_text().splitlines()]
    assert {Path(e["outputs"]["record"]["path"]).parent.name for e in entries} == {Path(r["run_dir"]).name
                                                                                   for r in done}


def test_ray_gives_the_same_table(local_batch, parts, tmp_path):
    ray = import_ray(local=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    # The test's Ray serves this machine only: its node listens on the loopback address.
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    try:
        batch = run_batch(bundled_model("unet"), parts, tmp_path / "ray", engine="ray", workers=1, **ARGS)
    finally:
        ray.shutdown()
    local = json.loads((local_batch[0] / "batch.json").read_text())

    def table(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert batch["engine"] == "ray" and batch["counts"]["reused"] == 0
    assert table(batch["rows"]) == table(local["rows"])


def test_another_job_in_the_batch_folder_is_refused(local_batch, parts):
    out = local_batch[0]
    table = (out / "batch.csv").read_bytes()
    with pytest.raises(OutputError, match=r"holds another batch \(its methods, settings differ\)"):
        run_batch(bundled_model("unet"), parts, out, **dict(ARGS, methods=["gradcam"]))
    assert (out / "batch.csv").read_bytes() == table


def test_cli_bad_policy_is_one_line(parts, tmp_path, capsys):
    from CTXAILib.cli import main

    code = main(["batch", "--model", str(bundled_model("unet")), "--inputs", str(parts), "--out",
                 str(tmp_path / "b"), "--policy", "confidence<0.9+half"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--policy term 'half' is not understood" in err
    assert not (tmp_path / "b").exists()


def test_classifier_explains_the_manifest_places(classifier_card, volume_file, tmp_path):
    """A classifier's items are the manifest's points and ROIs; a bad row is refused before any work."""
    from CTXAILib.batch.inputs import read_inputs

    manifest = tmp_path / "items.csv"
    manifest.write_text(f"part_id,volume,point,roi\nblock,{volume_file},16 16 16,\nblock,{volume_file},,"
                        "4 4 4 20 20 20\n")
    batch = run_batch(classifier_card, manifest, tmp_path / "out", methods=["saliency"], workers=1)
    rows = batch["rows"]
    assert [(r["defect_id"], r["selected_by"], r["status"]) for r in rows] == [(1, "given", "done"),
                                                                                (2, "given", "done")]
    for row in rows:
        record = json.loads((tmp_path / "out" / row["run_dir"] / "run.json").read_text())
        assert row["class"] == record["prediction"]["predicted_class"] == record["target"]["class"]
        assert row["mean_confidence"] == record["prediction"]["target_probability"]
    assert rows[1]["bbox_ijk"] == [4, 4, 4, 20, 20, 20] and rows[0]["centre_ijk"] == [16, 16, 16]
    manifest.write_text(f"volume,point\n{volume_file},16 16\n")
    with pytest.raises(InputError, match=r"items.csv row 1: point needs 3 integers"):
        read_inputs(manifest, "classification")
    with pytest.raises(InputError, match="a classifier explains given places"):
        read_inputs(volume_file.parent, "classification")


def test_folder_inputs_are_volumes_and_scan_folders_but_not_the_batch_folder(tmp_path):
    from CTXAILib.batch.inputs import read_inputs

    for name in ("b.nii.gz", "a.nrrd", "notes.txt", ".hidden.nrrd"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "series").mkdir()
    (tmp_path / "batch").mkdir()
    assert [s.part_id for s in read_inputs(tmp_path, "segmentation")] == ["a", "b", "batch", "series"]
    assert [s.part_id for s in read_inputs(tmp_path, "segmentation", exclude=tmp_path / "batch")] == ["a", "b",
                                                                                                      "series"]
    (tmp_path / "m.json").write_text(json.dumps([{"volume": "a.nrrd", "part_id": "p"},
                                                 {"volume": "b.nii.gz", "part_id": "p"}]))
    with pytest.raises(InputError, match=r"m.json row 2: part ID 'p' is given twice"):
        read_inputs(tmp_path / "m.json", "segmentation")
