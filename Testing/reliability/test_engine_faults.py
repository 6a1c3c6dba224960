"""Engine faults found by the campaign: cancel honoured everywhere a batch runs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from CTXAILib import Cancelled, Explainer, Target, load_model


def test_fail7_cancel_is_checked_before_every_measured_batch_of_the_batch_search(classifier_card, volume):
    model = load_model(classifier_card)
    explainer = Explainer(model, device="cpu", memory_mb=64)
    explainer.prepare(volume)
    event = threading.Event()
    after_cancel = []

    def forward(module, inputs):
        if event.is_set():
            after_cancel.append(inputs[0].shape[0])
        elif inputs[0].requires_grad:  # the first backward-pass batch of a fresh explainer is the search's
            event.set()

    model.module.register_forward_pre_hook(forward)
    with pytest.raises(Cancelled):
        explainer.explain(volume, "integrated_gradients", Target("pore"), settings={"steps": 64}, cancel=event)
    assert after_cancel == [], f"batches of sizes {after_cancel} ran after cancel was requested"


def test_under_load_the_batch_search_measures_the_small_sizes_and_keeps_the_larger(classifier_card):
    """On a busy machine a call costs a fixed delay whatever its batch: batch 1 then looks slow, and a search cut
    short by its time budget kept it (6.5x the passes' cost under load). Sizes up to 8 are always measured and the
    larger is kept unless clearly slower."""
    import time

    model = load_model(classifier_card)
    model.module.register_forward_pre_hook(lambda module, inputs: time.sleep(0.3))
    explainer = Explainer(model, device="cpu", memory_mb=256)
    assert explainer._fastest_batch((32, 32, 32), limit=32, backward=False, needed=64) >= 8


def test_under_load_a_run_far_slower_than_its_batch_choice_measures_again(classifier_card, volume):
    explainer = Explainer(load_model(classifier_card), device="cpu")
    target = Target("pore")
    explainer.explain(volume, "integrated_gradients", target, settings={"steps": 8})
    key = next(k for k in explainer._fastest if k[1])
    best, tried = explainer._fastest[key][:2]
    explainer._fastest[key] = (best, tried, 1e-9, 0.0)  # measured on a machine far faster than it is now
    explainer.explain(volume, "integrated_gradients", target, settings={"steps": 8})
    assert key not in explainer._fastest  # forgotten: the next run measures again
    explainer.explain(volume, "integrated_gradients", target, settings={"steps": 8})
    assert key in explainer._fastest
    explainer._fastest[key] = (best, tried, 1e3, 0.0)  # a choice the run keeps to
    explainer.explain(volume, "integrated_gradients", target, settings={"steps": 8})
    assert explainer._fastest[key] == (best, tried, 1e3, 0.0)


@pytest.fixture(scope="module")
def many_tiles(tmp_path_factory):
    """A U-Net of 16³ tiles and a volume of 27 of them: a large part in miniature."""
    from ctxai_testing import ct_volume, write_model

    return write_model(tmp_path_factory.mktemp("unet16"), "unet16", "segmentation", patch=(16, 16, 16)), \
        ct_volume(shape=(36, 36, 36))


def test_large_volumes_the_first_pass_reports_progress_per_tile_and_measures_batches_on_its_own_tiles(
        many_tiles):
    """A 512³ part sat at 0.0 % for ~100 s: the batch-size search ran made-up batches before the first tile. The
    first prediction now measures batch sizes on its own tiles and reports from its first tile on."""
    import time

    card, volume = many_tiles
    model = load_model(card)
    explainer = Explainer(model, device="cpu")
    tiles = len(explainer._grid(volume.shape).tiles)
    calls, events = [], []
    def started(module, inputs):
        time.sleep(0.05)  # a slower model, so that reports (at most one per 0.2 s) fall between its tiles
        calls.append([time.perf_counter(), None, inputs[0].shape[0]])

    def ended(module, inputs, output):
        calls[-1][1] = time.perf_counter()

    model.module.register_forward_pre_hook(started)
    model.module.register_forward_hook(ended)
    explainer.explain(volume, "confidence", Target("defect"),
                      progress=lambda p: events.append((time.perf_counter(), p.fraction, p.message)))
    # One sample probes the activation memory; every other one is a tile of the volume.
    assert sum(call[2] for call in calls[1:]) == tiles, "model samples beyond the tiles: a search on made-up input"
    assert calls[1][2] == 1  # the search starts at one tile per call, so the first tile is reported on its own
    first_done, last_started = calls[1][1], calls[-1][0]
    announced = [t for t, fraction, message in events if "27 tiles" in message]
    assert announced and announced[0] < calls[1][0], "no message saying what the run does before its first tile"
    during = [(t, f) for t, f, message in events if first_done < t < last_started and 0 < f < 1]
    assert during, f"no progress between the first tile ({first_done}) and the last ({last_started}): {events}"


def test_large_volumes_the_prediction_holds_no_float32_copy_of_all_classes(many_tiles):
    """At 512³ the prediction summed every class in float32 (1.5 GiB) and then copied it into float16 and checked
    a mask of it: 3.5x the float16 map it keeps. A one-tile float32 window now blends into the float16 map."""
    import tracemalloc

    from ctxai_testing import ct_volume

    card, _volume = many_tiles
    volume = ct_volume(shape=(64, 64, 64))  # 64 abutting tiles of 16³
    explainer = Explainer(load_model(card), device="cpu", overlap=0.0)
    prepared = explainer.prepare(volume)
    explainer._forward_limit(explainer.model.card.patch_shape)  # the memory probe's own tensors are not counted
    tracemalloc.start()
    try:
        probabilities = explainer.segmentation_probabilities(prepared)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert probabilities.dtype == np.float16 and probabilities.shape == (2, 64, 64, 64)
    # The map, the window (a quarter of the part's columns in float32: half the map) and a batch make 1.75x; the
    # float32 sum, its copy and a mask of it made 3.1x.
    assert peak <= 2.25 * probabilities.nbytes, f"prediction peak {peak / probabilities.nbytes:.2f}x its map"


_ROI_RUN = """
import sys, tempfile
from pathlib import Path
from ctxai_testing import ct_volume, write_model
from CTXAILib import BoxRegion, Explainer, Target, load_model
from CTXAILib.engine.geometry import Box
from CTXAILib.records.outputs import write_explanation

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

n, folder = int(sys.argv[1]), Path(sys.argv[2])
model = load_model(write_model(folder, "unet16", "segmentation", patch=(16, 16, 16)))
explainer = Explainer(model, device="cpu", overlap=0.0)
explainer._forward_limit(model.card.patch_shape)  # the memory probe's tensors are not the run's
volume = ct_volume(shape=(n,) * 3)
roi = Target("defect", region=BoxRegion(Box((n // 2 - 2,) * 3, (n // 2 + 2,) * 3)))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from what is resident now
before = status("VmRSS")
write_explanation(explainer.explain(volume, "saliency", roi), volume, model, folder / "out")
print(status("VmHWM") - before)
"""


def _roi_run_peak_mib(size: int, folder) -> float:
    import os
    import subprocess
    import sys

    folder.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _ROI_RUN, str(size), str(folder)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


def test_large_volumes_an_roi_run_to_its_files_makes_no_part_sized_copy(tmp_path):
    """At 512³ a run over one ROI held 5.2x the part besides the model: a normalised copy, a float32 map and a NaN
    confidence map of the whole part, and SimpleITK's copy of each file it wrote. A tile now normalises its own
    crop, the maps stay their extent's size until read, and the files are streamed. Measured as ctxai bench
    does: the peak resident memory of fresh processes on two part sizes, whose difference is what grows with the
    part (the volume itself is made before the measurement starts); the old path grew by ~4 volumes."""
    small, large = 128, 256
    grown = _roi_run_peak_mib(large, tmp_path / "large") - _roi_run_peak_mib(small, tmp_path / "small")
    volumes = (large ** 3 - small ** 3) * 4 / 2 ** 20
    assert grown < 1.0 * volumes, f"the run grew by {grown / volumes:.2f}x the volume"


def test_large_volumes_a_streamed_roi_run_writes_what_it_computed(many_tiles, tmp_path):
    from ctxai_testing import ct_volume

    from CTXAILib import BoxRegion
    from CTXAILib.engine.geometry import Box, PlacedVolume, read_volume
    from CTXAILib.records.outputs import write_explanation

    card, _volume = many_tiles
    volume = ct_volume(shape=(48, 48, 48))
    model = load_model(card)
    result = Explainer(model, device="cpu", overlap=0.0).explain(
        volume, "saliency", Target("defect", region=BoxRegion(Box((22, 22, 22), (26, 26, 26)))))
    assert isinstance(result.confidence, PlacedVolume) and result.confidence._array is None
    written = write_explanation(result, volume, model, tmp_path / "out")
    attribution, confidence = read_volume(written["attribution"]), read_volume(written["confidence"])
    np.testing.assert_array_equal(attribution.array, result.attribution.array)
    np.testing.assert_array_equal(confidence.array, result.confidence.array)
    predicted = Box(tuple(result.window["predicted_ijk"]["lo"]), tuple(result.window["predicted_ijk"]["hi"]))
    assert np.isnan(confidence.array).sum() == confidence.array.size - np.prod(predicted.shape) > 0
    assert np.isfinite(confidence.array[predicted.slices]).all() and attribution.array[result.extent.slices].any()
    assert np.array_equal(confidence.ijk_to_ras, attribution.ijk_to_ras)


def test_large_volumes_constant_baselines_are_made_per_tile_and_still_warn(many_tiles):
    """IG against air over a whole part built the normalised part and an air volume of its size before any tile
    ran. A constant baseline is now made tile by tile and the normalised part is never made; the warning that a
    baseline equals the input still comes (an all-air volume), and not for a volume that differs from air."""
    from ctxai_testing import ct_volume

    from CTXAILib import Volume
    from CTXAILib.engine.explain import _Baselines
    from CTXAILib.engine.geometry import Box

    card, _volume = many_tiles
    explainer = Explainer(load_model(card), device="cpu", overlap=0.0)
    air = Volume(np.full((32, 32, 32), -1000.0, np.float32), (0.2, 0.2, 0.2))
    for volume, equal in ((air, True), (ct_volume(shape=(32, 32, 32)), False)):
        prepared = explainer.prepare(volume)
        baselines = _Baselines(prepared, Box.whole(volume.shape), volume.spacing)
        tile = baselines.crop("air", 2.0, Box((0, 0, 0), (16, 16, 16)))
        assert tile.shape == (1, 1, 16, 16, 16) and float(tile.unique()) == prepared.air
        assert "x" not in baselines.__dict__  # the normalised part was not made
        assert bool(baselines.warnings()) == equal
        assert "x" not in baselines.__dict__
    result = explainer.explain(air, "integrated_gradients", Target("defect"),
                               settings={"steps": 2, "baseline": "air"})
    assert any("air baseline equals the input" in w for w in result.warnings)
