"""The one sliding-window path every method runs through for volumes larger than the model's patch.

The model of a large volume *is* its sliding-window inference: tiles of the patch size on a grid with overlap, each
tile's activated output weighted by a Gaussian importance map and normalised by the sum of weights. A target is a
linear function of that blended output (:mod:`.targets`), so it splits exactly into one weighted target per tile:

    T(x) = sum_t sum_v  m(v) g_t(v) / W(v)  a_t(x_t)(v)        (segmentation)
    T(x) = mean_t  a_t(x_t)                                    (classification: class evidence over the tiles)

Methods that are linear in the target (gradients, IG, SmoothGrad, GradientSHAP, DeepLIFT, guided backprop, LRP)
therefore give the whole-volume answer as the sum of their per-tile answers. CAMs are not linear and are blended
with the same Gaussian weights; a ``halo`` of voxels at inner tile borders is left out of the blend because CAMs of
zero-padded borders are unreliable. Perturbation methods evaluate the tiled model itself.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Box
from .modelcard import BLENDS

__all__ = ["BatchSizes", "NormalisedInput", "TileGrid", "batched", "crop_padded", "gaussian_importance",
           "predict_tiles"]


def _axis_gaussian(n: int, sigma_scale: float = 0.125) -> np.ndarray:
    """One axis of the importance map: a Gaussian, 1 at the centre, never below 0.1 (edges still count a little;
    the 3-D product stays above 1e-3)."""
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    weights = np.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2)
    return np.maximum(weights / weights.max(), 0.1)


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights over a (k, j, i) patch: a product of one Gaussian per axis, so that the sum over a grid of
    tiles is a product of per-axis sums too (see :meth:`TileGrid.normaliser`)."""
    k, j, i = (_axis_gaussian(n, sigma_scale) for n in patch)
    return (k[:, None, None] * j[None, :, None] * i[None, None, :]).astype(np.float32)


def _starts(size: int, patch: int, step: int) -> list[int]:
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch, step))
    starts.append(size - patch)
    return sorted(set(starts))


class NormalisedInput:
    """The volume as the model sees it, (1, C, K, J, I), normalised crop by crop when a tile reads it.

    A normalised copy of a whole part would be as large as the part itself; the card's normalisations are voxel-
    wise (with statistics fitted on the whole volume once), so normalising each crop gives the same voxels."""

    def __init__(self, raw: np.ndarray, normalise: Callable[[np.ndarray], np.ndarray]):
        self.raw = raw  # (C, K, J, I), any real dtype
        self.normalise = normalise
        self.shape = torch.Size((1,) + raw.shape)

    def crop(self, box: Box) -> torch.Tensor:
        """The normalised float32 crop (1, C, *box) of a box inside the volume."""
        return torch.from_numpy(np.ascontiguousarray(self.normalise(self.raw[(slice(None),) + box.slices]),
                                                     np.float32))[None]


def crop_padded(x: torch.Tensor | NormalisedInput, box: Box) -> torch.Tensor:
    """``x[..., box]`` for an (N, C, K, J, I) tensor, replicating edge voxels where the box leaves the volume."""
    shape = x.shape[-3:]
    inside = box.clip(shape)
    piece = x.crop(inside) if isinstance(x, NormalisedInput) else x[(...,) + inside.slices]
    # F.pad takes (i_before, i_after, j_before, j_after, k_before, k_after).
    pad = []
    for axis in range(3):
        pad += [inside.lo[axis] - box.lo[axis], box.hi[axis] - inside.hi[axis]]
    if any(pad):
        piece = F.pad(piece, pad, mode="replicate")
    return piece


@dataclass
class TileGrid:
    """Tiles of ``patch`` (k, j, i) over ``extent`` of a volume of ``shape`` with fractional ``overlap``.

    A patch larger than the volume along an axis gives one tile there, padded (see :func:`crop_padded`).
    ``patch=None`` means the model takes any size: one tile, the whole extent. ``blend`` is one of
    :data:`~.modelcard.BLENDS`.

    >>> grid = TileGrid(shape=(40, 40, 40), patch=(32, 32, 32), overlap=0.5)
    >>> len(grid.tiles), grid.tiles[-1].hi
    (8, (40, 40, 40))
    """

    shape: tuple[int, int, int]
    patch: tuple[int, int, int] | None
    overlap: float = 0.25
    extent: Box | None = None
    halo: int = 0
    blend: str = "gaussian"

    def __post_init__(self) -> None:
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        self.extent = self.extent or Box.whole(self.shape)
        if self.patch is None:
            self.patch = self.extent.shape
        lo, size = self.extent.lo, self.extent.size
        patch_ijk = tuple(reversed(self.patch))
        per_axis = []
        for axis in range(3):
            step = max(1, int(round(patch_ijk[axis] * (1.0 - self.overlap))))
            per_axis.append([lo[axis] + s for s in _starts(size[axis], patch_ijk[axis], step)])
        self.tiles = [Box(start, tuple(s + p for s, p in zip(start, patch_ijk)))
                      for start in itertools.product(*per_axis)]
        self._starts = per_axis
        self._axis_weights = [_axis_gaussian(p) if self.blend == "gaussian" else np.ones(p) for p in patch_ijk]
        k, j, i = reversed(self._axis_weights)
        self._importance = (k[:, None, None] * j[None, :, None] * i[None, None, :]).astype(np.float32)

    def select(self, region: Box) -> list[Box]:
        """Tiles that touch ``region``."""
        return [tile for tile in self.tiles if not tile.intersect(region).empty]

    def covering(self, tiles: Iterable[Box]) -> Box:
        """The part of the volume the given tiles cover."""
        tiles = list(tiles)
        return Box(np.min([t.lo for t in tiles], axis=0), np.max([t.hi for t in tiles], axis=0)).clip(self.shape)

    def importance(self, tile: Box) -> np.ndarray:
        """Weights of ``tile`` in the blend of model outputs (the same for every tile): Gaussian or constant."""
        return self._importance

    def blend_weights(self, tile: Box) -> np.ndarray:
        """Weights of ``tile`` when blending CAMs: its importance, with inner tile borders (the halo) left out."""
        if not self.halo:
            return self._importance
        weights = self._importance.copy()
        for axis_kji in range(3):
            axis_ijk = 2 - axis_kji
            h = min(self.halo, self.patch[axis_kji] // 4)
            # Keep borders that lie on the extent's edge: no other tile can cover them.
            index = [slice(None)] * 3
            if tile.lo[axis_ijk] > self.extent.lo[axis_ijk]:
                index[axis_kji] = slice(0, h)
                weights[tuple(index)] = 1e-6
            if tile.hi[axis_ijk] < self.extent.hi[axis_ijk]:
                index[axis_kji] = slice(self.patch[axis_kji] - h, None)
                weights[tuple(index)] = 1e-6
        return weights

    def normaliser(self, box: Box) -> np.ndarray:
        """Sum of all tiles' blending weights over ``box`` (k, j, i): the denominator W(v) of the blend.

        The tiles form a Cartesian grid and each weight is a product over axes, so the sum is the outer product of
        three 1-D sums: no volume-sized array is needed, whatever the size of the volume."""
        sums = []
        for axis in range(3):
            weights, patch = self._axis_weights[axis], len(self._axis_weights[axis])
            x = np.arange(box.lo[axis], box.hi[axis])
            total = np.zeros(x.shape)
            for start in self._starts[axis]:
                inside = (x >= start) & (x < start + patch)
                total[inside] += weights[x[inside] - start]
            sums.append(total)
        i, j, k = sums
        return (k[:, None, None] * j[None, :, None] * i[None, None, :]).astype(np.float32)

    @staticmethod
    def accumulate(out: np.ndarray, out_box: Box, tile: Box, values: np.ndarray) -> None:
        """``out[overlap] += values[overlap]`` where ``out`` covers ``out_box`` and ``values`` covers ``tile``.

        ``values`` may carry leading channel axes matching ``out``'s.
        """
        overlap = tile.intersect(out_box)
        if overlap.empty:
            return
        out[(...,) + overlap.offset([-v for v in out_box.lo]).slices] += \
            values[(...,) + overlap.offset([-v for v in tile.lo]).slices]



def batched(items: Sequence, size: int) -> Iterable[list]:
    """Consecutive chunks of at most ``size`` items."""
    for start in range(0, len(items), max(1, size)):
        yield list(items[start:start + max(1, size)])


class BatchSizes(Protocol):
    """Where a pass gets its batch sizes from, call by call, and times them (:class:`~.runtime.BatchSearch`)."""

    def next(self) -> int: ...

    def record(self, batch: int, seconds: float) -> None: ...


def predict_tiles(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: TileGrid, box: Box,
                  batch_size: int | BatchSizes, on_batch: Callable[[int], None] | None = None,
                  dtype: type = np.float32) -> np.ndarray:
    """Blended sliding-window output of a segmentation model over ``box``: (C, K, J, I) of ``dtype`` on the CPU.

    ``run`` maps a batch of input tiles (B, C, *patch) to activated outputs (B, C_out, *patch), on the CPU.
    ``batch_size`` is tiles per call, or a :class:`BatchSizes` that chooses each call's and is told its seconds.
    ``on_batch(tiles)`` is called before each call.

    The blend is summed in float32 over a window one tile wide along i only: the grid's tiles come in order of
    their i, so the columns before a tile's are final and move to the output. A float16 output of a whole part
    then takes a quarter of the memory of a float32 sum of all of it.
    """
    tiles = grid.select(box)
    total = window = None
    width = min(grid.patch[2], box.shape[2])
    start = box.lo[0]  # the window's first column (i), in volume indices

    def flush(upto: int) -> None:
        """Move the window's columns before ``upto`` into the output and slide the window there."""
        nonlocal start
        count = min(upto, box.hi[0]) - start
        if count <= 0:
            return
        total[..., start - box.lo[0]:start - box.lo[0] + count] = window[..., :count]
        window[..., :width - count] = window[..., count:].copy()
        window[..., width - count:] = 0.0
        start += count

    done = 0
    while done < len(tiles):
        size = batch_size if isinstance(batch_size, int) else batch_size.next()
        batch = tiles[done:done + max(1, size)]
        done += len(batch)
        if on_batch is not None:
            on_batch(len(batch))
        inputs = torch.cat([crop_padded(x, tile) for tile in batch])
        started = time.perf_counter()
        with torch.no_grad():
            outputs = run(inputs).float().cpu().numpy()
        if not isinstance(batch_size, int):
            batch_size.record(len(batch), time.perf_counter() - started)
        if total is None:
            total = np.empty((outputs.shape[1],) + box.shape, dtype)
            window = np.zeros((outputs.shape[1],) + box.shape[:2] + (width,), np.float32)
        for tile, output in zip(batch, outputs):
            flush(max(tile.lo[0], box.lo[0]))
            window_box = Box((start, box.lo[1], box.lo[2]), (start + width, box.hi[1], box.hi[2]))
            grid.accumulate(window, window_box, tile, output * (grid.importance(tile) / grid.normaliser(tile)))
    flush(box.hi[0])
    return total
