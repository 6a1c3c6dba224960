"""What `ctxai explain` writes: never over an input, never mixed with another run, nothing left by a killed run
or a failed write, and every fault of the output folder found before computing."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ctxai, digests, one_error_line


def explain(volume, model, out, *extra, method="saliency"):
    return ctxai("explain", "--volume", volume, "--model", model, "--method", method, "--device", "cpu",
                 "--quiet", "--out", out, *extra)


@pytest.mark.parametrize("which", ["volume", "card"])
def test_fail3_an_output_never_replaces_an_input(tmp_path, which, volume_file, classifier_card):
    folder = tmp_path / "work"
    folder.mkdir()
    volume, model = volume_file, classifier_card
    if which == "volume":
        volume = shutil.copy(volume_file, folder / "attribution.nrrd")
    else:
        shutil.copy(classifier_card.with_suffix(".pt"), folder / "classifier.pt")
        model = shutil.copy(classifier_card, folder / "run.json")
    before = digests(folder)
    one_error_line(explain(volume, model, folder), "would replace input")
    assert digests(folder) == before


def test_fail4_a_run_owns_its_out_folder(tmp_path, volume_file, classifier_card, unet_card):
    out = tmp_path / "run"
    assert explain(volume_file, unet_card, out).returncode == 0
    unet_run = digests(out)
    assert "confidence.nrrd" in unet_run
    one_error_line(explain(volume_file, classifier_card, out), "another run's files", "--overwrite")
    assert digests(out) == unet_run
    replaced = explain(volume_file, classifier_card, out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["name"] == "classifier"
    assert sorted(os.listdir(out)) == sorted([*record["outputs"].values(), "run.json"]) == [
        "attribution.nrrd", "run.json"]


def test_fail5_sigterm_is_handled_like_sigint(tmp_path, volume_file, classifier_card):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "CTXAILib.cli", "explain", "--volume", str(volume_file),
                                "--model", str(classifier_card), "--method", "occlusion", "--set", "window=1", "--set",
                                "stride=1", "--set", "engine=exhaustive", "--memory-mb", "32", "--device", "cpu",
                                "--out", str(out), "--force"],  # long on purpose: near the 2 h limit when loaded
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4.0)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "no output was written" in stderr, stderr
    assert not out.exists() or not any(out.iterdir())


def test_fail5_stale_staging_folders_are_removed_by_the_next_run(tmp_path, volume_file, classifier_card):
    out = tmp_path / "run"
    stale = out / ".ctxai-partial-killed"
    stale.mkdir(parents=True)
    (stale / "attribution.nrrd").write_bytes(b"NRRD0004\n")  # what SIGKILL during a write leaves
    os.utime(stale, (time.time() - 60, time.time() - 60))
    result = explain(volume_file, classifier_card, out)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["attribution.nrrd", "run.json"]


def test_weak_memory_mb_must_be_positive(tmp_path, volume_file, classifier_card):
    for value in ("0", "-5", "nan"):
        out = explain(volume_file, classifier_card, tmp_path / "run", "--memory-mb", value)
        assert out.returncode == 2 and "greater than 0" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["existing file", "read-only file system"])
def test_weak_unwritable_out_is_refused_before_computing(tmp_path, where, volume_file, classifier_card):
    target = tmp_path / "a-file" if where == "existing file" else "/sys/ctxai-reliability-out"
    if where == "existing file":
        target.write_text("keep me")
    # Computing these steps takes minutes here: an error after computing would time out.
    out = ctxai("explain", "--volume", volume_file, "--model", classifier_card, "--method", "integrated_gradients",
                "--set", "steps=100000", "--device", "cpu", "--quiet", "--out", target, timeout=120)
    one_error_line(out, str(target))
    if where == "existing file":
        assert target.read_text() == "keep me"


def test_weak_full_disk_is_one_line_and_leaves_nothing(tmp_path, volume_file, classifier_card):
    out = tmp_path / "run"

    def small_disk():  # as `ulimit -f`: writes past 8 KiB fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    result = subprocess.run([sys.executable, "-m", "CTXAILib.cli", "explain", "--volume", str(volume_file),
                             "--model", str(classifier_card), "--method", "saliency", "--device", "cpu", "--quiet",
                             "--out", str(out)], capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    one_error_line(result, "Could not write", str(out))
    assert digests(out) == {} and not list(out.iterdir())
