"""Progress, cancellation, out-of-memory back-off and the sliding-window grid."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from CTXAILib import Box, Cancelled, Explainer, LoadedModel, Target, load_model
from CTXAILib.engine.sliding import TileGrid, crop_padded, gaussian_importance


class CountingCancel:
    """A cancel flag that turns on after it was polled ``after`` times, noting how many model calls had run."""

    def __init__(self, after: int, calls: list):
        self.after = after
        self.calls = calls
        self.polls = 0
        self.calls_when_set = None

    def is_set(self) -> bool:
        self.polls += 1
        if self.polls > self.after and self.calls_when_set is None:
            self.calls_when_set = len(self.calls)
        return self.polls > self.after


def test_cancel_stops_ig_within_one_batch(classifier_card, volume):
    model = load_model(classifier_card)
    calls = []
    model.module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    explainer = Explainer(model, device="cpu", memory_mb=64)
    cancel = CountingCancel(after=4, calls=calls)
    with pytest.raises(Cancelled, match="cancelled"):
        explainer.explain(volume, "integrated_gradients", Target("pore"), settings={"steps": 512}, cancel=cancel)
    # The flag may be seen during the batch-size search or during IG itself: both poll it before every batch.
    assert sum(calls) < 512 / 2  # it stopped long before the end
    assert len(calls) == cancel.calls_when_set  # no model call ran after the flag was seen


def test_cancel_from_another_thread(classifier_card, volume):
    """The GUI sets the flag from another thread; no batch starts after that (the batch-size search's included),
    and the run ends right after the batch in flight (timed against the batches themselves, so a slow machine does
    not matter)."""
    model = load_model(classifier_card)
    starts, ends = [], []
    model.module.register_forward_pre_hook(lambda m, i: starts.append(time.perf_counter()))
    model.module.register_forward_hook(lambda m, i, o: ends.append(time.perf_counter()))
    explainer = Explainer(model, device="cpu", memory_mb=64)
    explainer.prepare(volume)
    event = threading.Event()
    set_at = []
    timer = threading.Timer(0.2, lambda: (set_at.append(time.perf_counter()), event.set()))
    # Start the clock once IG is running (its set-up is not a batch), as an analyst would press Cancel.
    model.module.register_forward_hook(lambda m, i, o: timer.start() if len(ends) == 5 else None)
    with pytest.raises(Cancelled):
        explainer.explain(volume, "integrated_gradients", Target("pore"), settings={"steps": 512}, cancel=event)
    stopped = time.perf_counter()
    timer.join()
    assert not [t for t in starts if t > set_at[0]], "a batch started after cancel was requested"
    in_flight_end = max([e for e in ends if e > set_at[0]], default=set_at[0])
    # The batch in flight still runs its backward pass (about twice its forward): on a loaded machine that alone
    # can take longer than a fixed half second, so the bound follows the slowest forward seen.
    slowest_forward = max(end - start for start, end in zip(starts, ends))
    assert stopped - in_flight_end < 0.5 + 3 * slowest_forward


def test_progress_reports(classifier_card, volume):
    reports = []
    Explainer(classifier_card, device="cpu", memory_mb=64).explain(
        volume, "integrated_gradients", Target("pore"), settings={"steps": 64}, progress=reports.append)
    fractions = [r.fraction for r in reports]
    assert fractions[-1] == 1.0 and reports[-1].message == "done" and reports[-1].eta_s == 0.0
    method_reports = [r for r in reports if r.message == "Integrated Gradients"]
    assert method_reports, [r.message for r in reports]
    assert all(a <= b for a, b in zip(fractions[1:-1], fractions[2:-1]))


class OutOfMemoryAbove(nn.Module):
    """A real network that fails like a GPU out of memory when a batch exceeds ``limit`` samples."""

    def __init__(self, network: nn.Module, limit: int):
        super().__init__()
        self.network = network
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: a batch of {x.shape[0]} does not fit")
        return self.network(x)


def test_batch_backs_off_on_out_of_memory(classifier_card, volume):
    model = load_model(classifier_card)
    reference = Explainer(model, device="cpu", memory_mb=1e6).explain(
        volume, "integrated_gradients", Target("pore"), settings={"steps": 32}).attribution.array
    limited = OutOfMemoryAbove(model.module, limit=5)
    explainer = Explainer(LoadedModel(limited, model.card, model.sha256), device="cpu", memory_mb=1e6)
    result = explainer.explain(volume, "integrated_gradients", Target("pore"), settings={"steps": 32})
    assert max(limited.sizes) > 5 and limited.sizes[-1] <= 5  # it tried big, then went on smaller
    np.testing.assert_allclose(result.attribution.array, reference, rtol=1e-4, atol=1e-7)


def test_grid_covers_volume_and_ends_at_edges():
    grid = TileGrid(shape=(50, 37, 64), patch=(32, 32, 32), overlap=0.25)
    covered = np.zeros((50, 37, 64), int)
    for tile in grid.tiles:
        covered[tile.slices] += 1
    assert covered.min() >= 1
    assert max(t.hi[0] for t in grid.tiles) == 64 and max(t.hi[2] for t in grid.tiles) == 50
    assert all(t.size == (32, 32, 32) for t in grid.tiles)


def test_grid_pads_small_volumes():
    grid = TileGrid(shape=(10, 40, 40), patch=(16, 16, 16), overlap=0.5)
    assert {t.lo[2] for t in grid.tiles} == {0} and {t.hi[2] for t in grid.tiles} == {16}
    x = torch.arange(10 * 40 * 40, dtype=torch.float32).reshape(1, 1, 10, 40, 40)
    piece = crop_padded(x, grid.tiles[0])
    assert piece.shape == (1, 1, 16, 16, 16)
    torch.testing.assert_close(piece[0, 0, 9:], piece[0, 0, 9:10].expand(7, 16, 16))  # replicated edge


def test_gaussian_importance():
    weights = gaussian_importance((8, 16, 9))
    assert weights.shape == (8, 16, 9) and weights.max() == pytest.approx(1.0) and weights.min() >= 1e-3
    np.testing.assert_allclose(weights, weights[::-1, ::-1, ::-1])


def test_halo_leaves_inner_borders_out_of_blend():
    grid = TileGrid(shape=(64, 64, 64), patch=(32, 32, 32), overlap=0.5, halo=4)
    inner = [t for t in grid.tiles if t.lo == (16, 16, 16)][0]
    corner = [t for t in grid.tiles if t.lo == (0, 0, 0)][0]
    assert grid.blend_weights(inner)[:4].max() <= 1e-6 and grid.blend_weights(inner)[-4:].max() <= 1e-6
    assert grid.blend_weights(corner)[0].max() > 1e-6  # the volume's own border stays covered
    assert grid.blend_weights(corner)[-4:].max() <= 1e-6


def test_separable_normaliser_equals_the_sum_of_tile_weights():
    grid = TileGrid(shape=(37, 50, 29), patch=(16, 24, 16), overlap=0.4)
    brute = np.zeros((37, 50, 29))
    for tile in grid.tiles:
        TileGrid.accumulate(brute, Box.whole((37, 50, 29)), tile, grid.importance(tile).astype(np.float64))
    np.testing.assert_allclose(grid.normaliser(Box.whole((37, 50, 29))), brute, rtol=1e-5)
    inner = Box((3, 5, 7), (20, 30, 25))
    np.testing.assert_allclose(grid.normaliser(inner), brute[inner.slices], rtol=1e-5)


def test_channels_last_layout_gives_the_same_map(classifier_card, volume):
    maps = []
    for channels_last in (False, True):
        explainer = Explainer(load_model(classifier_card), device="cpu", channels_last=channels_last)
        conv = explainer.model.get_layer("features.block1.conv2")  # conv1 has one input channel: both layouts
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
        maps.append(explainer.explain(volume, "integrated_gradients", Target("pore"), settings={"steps": 8})
                    .attribution.array)
    np.testing.assert_allclose(maps[1], maps[0], rtol=1e-4, atol=1e-6 * float(np.abs(maps[0]).max()))
