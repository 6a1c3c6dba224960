"""The explainer: checks the input, predicts, resolves the target, plans the tiles and runs a method over them.

>>> from CTXAILib import Explainer, Target, Volume, BoxRegion, Box           # doctest: +SKIP
>>> explainer = Explainer("Resources/Models/classifier.json", device="auto")  # doctest: +SKIP
>>> result = explainer.explain(volume, "gradcam", Target("pore", region=BoxRegion(Box((10, 10, 10), (58, 58, 58)))))
...                                                                          # doctest: +SKIP
>>> result.attribution.same_geometry(volume)                                 # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import InputError, LayerError, MethodError, ModelError
from . import methods  # noqa: F401  (registers every method)
from .baselines import make_baseline
from .geometry import Box, PlacedVolume, Volume
from .methods.registry import MethodSpec, TileContext, VolumeContext, get_method
from .modelcard import BLENDS, ModelCard, Normalization
from .models import LoadedModel, load_model
from .progress import CancelToken, Progress, ProgressCallback, RunMonitor
from .resample import ModelGrid
from .runtime import (BatchSearch, MemoryBudget, activation_bytes, autocast, is_out_of_memory, resolve_device,
                      with_backoff)
from .signs import SIGNS
from .sliding import NormalisedInput, TileGrid, batched, crop_padded, predict_tiles
from .targets import BoxRegion, ResolvedTarget, Target

__all__ = ["Explainer", "Explanation", "Probe", "ScoreModel", "volume_sha256"]

_BATCH_LIMIT = 64
_RECHECK = 3.0      # a run this many times slower per sample than its batch choice predicted measures again
_TIME_LIMIT_S = 2 * 3600.0  # a run estimated to take longer is refused unless forced
_ESTIMATED_PASSES = 32      # runs of fewer tile passes start without a timed pass: they cost less than measuring
_CLIPPED = 0.5              # a larger fraction of voxels beyond one end of the card's window is warned about
                            # (air below the window's low end is common: half of its noisy voxels lie below)


_CONSTANT_BASELINES = ("zeros", "air")  # baselines that are one value: made tile by tile


def volume_sha256(volume: Volume) -> str:
    """Digest of a volume's voxels and geometry: the run record's input hash."""
    digest = hashlib.sha256()
    array = np.ascontiguousarray(volume.array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(np.asarray(volume.ijk_to_ras, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _applied(card: Normalization, fitted: Normalization) -> dict[str, Any]:
    """The run record's account of the intensity normalisation: the card's, and the numbers the volume gave it."""
    applied = fitted.to_dict()
    if card.per_volume:
        applied["per_volume"] = ("statistics computed once from the whole unperturbed input volume; every tile, "
                                 "perturbed copy and baseline of the run used these same numbers")
    return applied


def _all_finite(array: np.ndarray) -> bool:
    """No NaN or Inf in a map of shape (..., K, J, I); checked slab by slab, so that no volume-sized mask is made."""
    if array.ndim < 3:
        return bool(np.isfinite(array).all())
    return all(np.isfinite(array[..., k:k + 16, :, :]).all() for k in range(0, array.shape[-3], 16))


def _scale_per_axis(factors: np.ndarray) -> str:
    """Size factors along i, j, k in words, axes with the same factor (within 5 %) named together:
    "1.28x in-plane (i, j), 0.15x through-plane (k)", or "0.5x along i, 1x along j, 2x along k"."""
    i, j, k = (float(f) for f in factors)
    if abs(i - j) <= 0.05 * max(i, j):
        if abs(i - k) <= 0.05 * max(i, k):
            return f"{i:.3g}x along every axis (i, j, k)"
        return f"{i:.3g}x in-plane (i, j), {k:.3g}x through-plane (k)"
    return f"{i:.3g}x along i, {j:.3g}x along j, {k:.3g}x along k"


def activate(output: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(output, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(output)
    return output


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds / 60:.3g} min" if seconds >= 60 else \
        f"{seconds:.3g} s"


def _available_bytes(device: torch.device) -> int:
    """Memory one pass may take: free GPU memory, or the RAM available on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _intensity_warnings(card: ModelCard, raw: np.ndarray) -> list[str]:
    """Warnings, with figures, when the volume's grey values do not fit the card's normalisation: a large
    fraction clipped by its window, or a range far from the one the model was trained on. Figures come from a
    strided sample of at most ~2 million voxels (a whole part would cost a copy of itself)."""
    norm = card.normalization
    if norm.type not in ("window", "meanstd"):
        return []
    step = max(1, int(np.ceil((raw.size / 2e6) ** (1 / 3))))
    sample = np.asarray(raw[..., ::step, ::step, ::step], np.float64).ravel()
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
    spread = f"1st-99th percentile {p1:.4g} to {p99:.4g}"
    fix = f"Check that the volume is in the units the model was trained on, or fix 'normalization' in {card.path}."
    if norm.type == "window":
        lo, hi = norm.window
        below, above = float(np.mean(sample < lo)), float(np.mean(sample > hi))
        warnings = []
        if max(below, above) > _CLIPPED:
            warnings.append(f"{100 * (below + above):.3g} % of the voxels lie outside the card's window "
                            f"[{lo:g}, {hi:g}] ({100 * below:.3g} % below, {100 * above:.3g} % above; {spread}) and "
                            f"are clipped to its ends: the model sees them as one grey value and may find nothing. "
                            f"{fix}")
        elif p99 - p1 < 0.05 * (hi - lo):
            warnings.append(f"The volume's grey values ({spread}) span {100 * (p99 - p1) / (hi - lo):.2g} % of the "
                            f"card's window [{lo:g}, {hi:g}]: far from the range the model was trained on. {fix}")
        return warnings
    mean, std = float(sample.mean()), float(sample.std())
    if abs(mean - norm.mean) > 3 * norm.std or not 0.1 * norm.std <= std <= 10 * norm.std:
        return [f"The volume's grey values (mean {mean:.4g}, std {std:.4g}; {spread}) are far from the card's "
                f"mean {norm.mean:g} and std {norm.std:g}: after normalisation they lie "
                f"{(mean - norm.mean) / norm.std:+.3g} std from what the model was trained on. {fix}"]
    return []


class ScoreModel(nn.Module):
    """The model followed by a linear target: input tile (N, C, D, H, W) -> score (N,).

    ``weights`` has the shape of one sample's output, (classes,) or (classes, D, H, W); ``activation`` is applied
    first when the target is a probability. Every call ticks the run monitor, which is where progress is counted
    and cancellation happens.
    """

    def __init__(self, network: nn.Module, weights: torch.Tensor, activation: str, monitor: RunMonitor,
                 precision: str = "fp32"):
        super().__init__()
        self.network = network
        self.register_buffer("weights", weights)
        self.activation = activation
        self.monitor = monitor
        self.precision = precision

    def activated(self, output: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """Model output with the target's activation, float32; ``activation`` overrides it (LRP explains logits)."""
        return activate(output.float(), self.activation if activation is None else activation)

    def reduce(self, output: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """The target score of a model output (see :meth:`activated`)."""
        output = self.activated(output, activation)
        if output.shape[1:] != self.weights.shape:
            raise ModelError(f"The model's output per sample has shape {tuple(output.shape[1:])}, but this target "
                             f"needs {tuple(self.weights.shape)} (segmentation outputs must match the input size). "
                             "Check the model card's task, class_names and patch_size.")
        return (output * self.weights).flatten(1).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.monitor.tick(x.shape[0])
        with autocast(x.device, self.precision):
            output = self.network(x)
        if torch.is_grad_enabled() and x.requires_grad and not output.requires_grad:
            raise MethodError("The model's output has no gradient with respect to its input (it detaches, "
                              "thresholds or runs under no_grad), so gradient methods cannot explain it. Use a "
                              "perturbation method: occlusion, lime, kernel_shap or feature_ablation.")
        return self.reduce(output)


@dataclass
class Explanation:
    """The result of one run. ``attribution`` is float32 (k, j, i) in the input's exact geometry (or the
    computed extent's, with ``output="extent"``); ``confidence`` is the segmentation model's probability of the
    target class (None for classifiers) over what was predicted: the whole input for a whole-volume or clicked-
    component target, else only the region's bounding box (from the tiles that reach it: exact there), in the
    input's geometry with NaN ("not predicted") outside it, or that box alone with ``output="extent"``. In the
    input's geometry it is a :class:`~.geometry.PlacedVolume`: float32 and full-size only once its array is read,
    written to a file from the float16 prediction directly."""

    attribution: Volume
    method: str
    settings: dict[str, Any]
    sign: str  # the method's: a key of CTXAILib.engine.signs.SIGNS
    family: str
    target: dict[str, Any]
    layer: str | None
    prediction: dict[str, Any]
    extent: Box
    confidence: Volume | None
    timings: dict[str, float]
    device: str
    precision: str
    input_sha256: str
    warnings: list[str] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)  # as applied: the volume's statistics included
    fixed_target: Target | None = None  # the target as resolved: re-explains the same voxels on a changed model
    runner_up: str | None = None        # classification: the second most probable class of the explained patch
    seed: int = 0
    output: str = "full"
    # How the run was tiled and batched (overlap, blend, halo, min_tile_share, memory_mb: what re-running it needs),
    # the tiles explained and the IJK box the model's prediction covers (a segmentation ROI run predicts only that).
    window: dict[str, Any] = field(default_factory=dict)
    resampling: dict[str, Any] | None = None  # the grids, when the card resamples to its spacing (engine/resample.py)
    ensemble: dict[str, Any] | None = None    # the members and how their maps were combined, for a fold ensemble

    @property
    def signed(self) -> bool:
        return SIGNS[self.sign].signed


@dataclass
class Probe:
    """How a run queried the model, handed to an ``evaluate`` hook of :meth:`Explainer.explain` so that a check
    (e.g. faithfulness, in the checks wing) can query it the same way without the engine knowing the check.

    ``x`` is the normalised input over the run's extent, (1, C, *extent); ``forward`` maps a batch of such extents
    (N, C, *extent) to the target's score (N,) through the same sliding window; ``baseline(kind, sigma_mm)`` is one
    of the registered baselines over the extent; ``batch_size`` extents fit one ``forward`` call."""

    x: torch.Tensor
    forward: Callable[[torch.Tensor], torch.Tensor]
    baseline: Callable[..., torch.Tensor]
    batch_size: int
    settings: dict[str, Any]
    seed: int


Evaluate = Callable[[Probe, np.ndarray], dict]


@dataclass
class _Prepared:
    volume: Volume
    x: torch.Tensor | NormalisedInput  # (1, C, K, J, I) normalised, CPU: read it with crop_padded
    sha256: str
    air: float                 # normalised air value
    normalization: Normalization  # the card's, with this volume's statistics when it has per-volume ones
    probabilities: np.ndarray | None = None  # segmentation: blended (classes, K, J, I)
    class_probabilities: dict[Box, np.ndarray] = field(default_factory=dict)  # classification, per extent
    extent_probabilities: dict[Box, np.ndarray] = field(default_factory=dict)  # segmentation, per ROI extent
    warnings: list[str] = field(default_factory=list)  # about the volume's intensities against the card


@dataclass
class _Plan:
    grid: TileGrid
    tiles: list[Box]
    extent: Box
    channels: torch.Tensor                    # the target's weight per output class
    target: ResolvedTarget | None = None      # segmentation: the region whose blended outputs are summed

    def weights(self, index: int) -> torch.Tensor:
        """The target's weights over one output sample of tile ``index``: built when needed, because all tiles'
        (classes, D, H, W) weights of a large part would take more memory than the part itself."""
        if self.target is None:  # classification: the class evidence averaged over the tiles
            return self.channels / len(self.tiles)
        tile = self.tiles[index]
        voxels = self.target.region_weights(tile) * self.grid.importance(tile) / self.grid.normaliser(tile)
        return self.channels[:, None, None, None] * torch.from_numpy(voxels)[None]


class Explainer:
    """Explains a model's predictions on volumes; keeps the model on its device and the last volume prepared.

    ``memory_mb`` bounds activation memory (default: a share of free GPU memory or RAM); batch sizes follow it
    and halve on out-of-memory. ``overlap``, ``blend`` and ``halo`` shape the sliding window (see :mod:`.sliding`);
    ``overlap`` and ``blend`` default to the card's ``sliding_window``, else 0.25 and Gaussian. The tiles
    with the least say in a segmentation target's blended weight are skipped as long as together they carry at most
    ``min_tile_share`` of it, which changes the explained target by at most that share; 0 keeps every tile and
    makes the tiled answer exact. ``channels_last`` (default: on GPU) stores convolution weights as NDHWC.

    Before a run starts its cost is estimated (tile passes x seconds per pass, timed on one patch; activation memory
    of one pass): a run over ``time_limit_s`` or whose one pass needs more memory than the device has free is
    refused with the estimate and what lowers it, unless ``force``.
    """

    def __init__(self, model: LoadedModel | str | Path, device: str | torch.device = "auto", precision: str = "fp32",
                 memory_mb: float | None = None, overlap: float | None = None, halo: int | None = None,
                 min_tile_share: float = 0.01, channels_last: bool | None = None, blend: str | None = None,
                 force: bool = False, time_limit_s: float = _TIME_LIMIT_S):
        self.device = resolve_device(device)
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.model.to(self.device)
        self.model.check_output()
        # GPUs run 3-D convolutions fastest with channels last (NDHWC, what tensor cores read); convolution weights in
        # that layout make every activation follow it. A CPU's own kernels prefer the default layout.
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        if self.channels_last and not self.model.is_torchscript:
            self.model.module.to(memory_format=torch.channels_last_3d)
        self.precision = precision
        with autocast(self.device, precision):  # validates the precision name now rather than mid-run
            pass
        self.budget = MemoryBudget.default(self.device, memory_mb)
        self._prepared: _Prepared | None = None
        self.overlap: float | None = None
        self.blend: str | None = None
        self.set_sliding_window(overlap, blend)
        if not 0.0 <= min_tile_share < 1.0:
            raise InputError(f"min_tile_share must be in [0, 1), got {min_tile_share}.")
        self.min_tile_share = min_tile_share
        self.force = force
        self.time_limit_s = time_limit_s
        self._pass_seconds: dict[tuple, float] = {}
        patch = self.model.card.patch_shape
        self.halo = halo if halo is not None else (min(patch) // 8 if patch else 0)
        self._model_grid: tuple[str, ModelGrid, Volume] | None = None  # input digest, grids, resampled input
        self._members: list[Explainer] | None = None
        self._per_sample: dict[tuple, int] = {}
        # (patch, backward) -> (fastest batch, largest tried, its seconds per sample, seconds the search took)
        self._fastest: dict[tuple, tuple[int, int, float, float]] = {}

    def set_sliding_window(self, overlap: float | None = None, blend: str | None = None) -> None:
        """The tiling of later runs: ``overlap`` (fraction of the patch shared by neighbouring tiles, in [0, 1))
        and ``blend`` (one of :data:`~.modelcard.BLENDS`); None takes the card's ``sliding_window``, else 0.25 and
        Gaussian. A change forgets the kept prediction, which was blended on the old tiling."""
        window = self.model.card.sliding_window
        overlap = float(window.get("overlap", 0.25) if overlap is None else overlap)
        if not 0.0 <= overlap < 1.0:
            raise InputError(f"Sliding-window overlap must be in [0, 1), got {overlap}: the fraction of the patch "
                             "that neighbouring tiles share (e.g. 0.5).")
        blend = window.get("blend", "gaussian") if blend is None else blend
        if blend not in BLENDS:
            raise InputError(f"Sliding-window blend must be one of {', '.join(BLENDS)}, got {blend!r}.")
        if (overlap, blend) != (self.overlap, self.blend):
            self._prepared = None
        self.overlap, self.blend = overlap, blend

    def variant(self, model: LoadedModel) -> Explainer:
        """An explainer of another model of the same card (e.g. with re-initialised weights) that keeps this one's
        device, precision, memory budget, sliding window and measured batch sizes."""
        other = Explainer(model, self.device, self.precision, self.budget.bytes / 2 ** 20, self.overlap, self.halo,
                          self.min_tile_share, self.channels_last, self.blend, self.force, self.time_limit_s)
        other._fastest = dict(self._fastest)
        other._per_sample = dict(self._per_sample)
        return other

    # ----------------------------------------------------------------------------------------------- input
    def prepare(self, volume: Volume) -> _Prepared:
        """Check a volume against the model and normalise it; the last one is kept for the next run."""
        if not isinstance(volume, Volume):
            raise InputError(f"Expected a CTXAILib.Volume, got {type(volume).__name__}. Wrap arrays with "
                             "Volume(array, spacing, origin, directions) or read a file with read_volume().")
        card = self.model.card
        if volume.channels != card.input_channels:
            raise InputError(f"Model {card.name!r} expects {card.input_channels} input channel(s) but the volume has "
                             f"{volume.channels} (array shape {volume.array.shape}). Give a "
                             f"{'scalar' if card.input_channels == 1 else f'{card.input_channels}-component'} volume.")
        if not np.issubdtype(volume.array.dtype, np.number) or np.issubdtype(volume.array.dtype, np.complexfloating):
            raise InputError(f"Volume voxels must be real numbers, got dtype {volume.array.dtype}.")
        finite = not np.issubdtype(volume.array.dtype, np.floating) or _all_finite(volume.array)
        if not finite:  # checked slab by slab: a mask of the whole part is only made to report the first one
            bad = ~np.isfinite(volume.array)
            first = np.argwhere(bad)[0][-3:][::-1]
            raise InputError(f"The volume has {int(bad.sum())} NaN or infinite voxel(s), the first at voxel "
                             f"{tuple(int(v) for v in first)} (i,j,k). Replace them (e.g. threshold or fill the "
                             "volume in Slicer) before explaining: they would poison every attribution.")
        sha = volume_sha256(volume)
        if self._prepared is not None and self._prepared.sha256 == sha:
            return self._prepared
        array = volume.array if volume.array.ndim == 4 else volume.array[None]
        # Fitted once on the whole unperturbed volume: tiles, perturbed copies and baselines share its statistics.
        normalization = card.normalization.fitted(array)
        # Normalised when a tile reads its crop: a normalised copy of a whole part would be another part's size.
        x = (torch.from_numpy(array)[None] if normalization.type == "none" and array.dtype == np.float32
             else NormalisedInput(array, normalization.apply))
        air = float(normalization.apply(card.raw_air(float(np.min(volume.array)))))
        self._prepared = _Prepared(volume, x, sha, air, normalization,
                                   warnings=_intensity_warnings(card, volume.array))
        return self._prepared

    def model_grid(self, volume: Volume) -> tuple[ModelGrid, Volume] | None:
        """The grids and ``volume`` resampled to the card's spacing, when the card asks for it and the volume is
        elsewhere; None otherwise. The last volume's are kept."""
        card = self.model.card
        if (not card.resample_to_spacing or not isinstance(volume, Volume)
                or (self._model_grid is not None and volume is self._model_grid[2])):
            return None  # the resampled volume itself is on the model's grid, whatever its rounded spacing says
        grid = ModelGrid.between(volume, card.spacing_mm)
        if not grid.needed:
            return None
        sha = volume_sha256(volume)
        if self._model_grid is None or self._model_grid[0] != sha:
            self._model_grid = (sha, grid, grid.to_model(volume))
        return self._model_grid[1], self._model_grid[2]

    def _explain_resampled(self, volume: Volume, grid: ModelGrid, model_volume: Volume, target: Target | None,
                           output: str, explain: Callable[..., Explanation]) -> Explanation:
        """Explain on the model grid, then bring the maps, the extent and the target back to the input's grid."""
        target = target if isinstance(target, Target) else Target(target)
        inner = explain(model_volume, grid.target(target), "full")
        attribution = grid.to_input(inner.attribution.array, volume)
        scale = grid.scale[::-1]
        lo = np.floor(np.asarray(inner.extent.lo) * scale + 1e-9).astype(int)
        hi = np.ceil(np.asarray(inner.extent.hi) * scale - 1e-9).astype(int)
        extent = Box(tuple(lo), tuple(hi)).clip(volume.shape)
        fixed = None if inner.fixed_target is None else grid.fixed(inner.fixed_target)
        described = dict(inner.target, region=target.region.describe())
        if fixed is not None:
            described["box"] = [list(fixed.region.box.lo), list(fixed.region.box.hi)]
        return replace(inner, attribution=attribution.crop(extent) if output == "extent" else attribution,
                       confidence=None if inner.confidence is None else grid.to_input(inner.confidence.array, volume),
                       extent=extent, target=described, fixed_target=fixed, input_sha256=self._model_grid[0],
                       warnings=[grid.message()] + inner.warnings, resampling=grid.describe())

    def _explain_members(self, volume: Volume, target: Target | None, progress: ProgressCallback | None,
                         explain: Callable[..., Explanation]) -> Explanation:
        """A fold ensemble: each member explains the same voxels (the first one's resolved target); the map and the
        confidence are the mean of theirs."""
        if self._members is None:
            self._members = [self.variant(member) for member in self.model.members]
        runs: list[Explanation] = []
        for index, member in enumerate(self._members):
            def scaled(report: Progress, index: int = index) -> None:
                if progress is not None:
                    progress(Progress((index + report.fraction) / len(self._members),
                                      f"fold {index + 1}/{len(self._members)}: {report.message}", None))

            runs.append(explain(member, target if not runs else runs[0].fixed_target, scaled))
        first, count = runs[0], len(runs)
        attribution = first.attribution.with_array(sum(run.attribution.array for run in runs) / np.float32(count))
        confidence = None if first.confidence is None else first.confidence.with_array(
            sum(run.confidence.array for run in runs) / np.float32(count))
        names = [member.card.name for member in self.model.members]
        timings = {key: sum(run.timings.get(key, 0.0) for run in runs) for key in first.timings}
        note = (f"Fold ensemble: the map and the confidence are the mean of the {count} members' ({', '.join(names)}), "
                "each explaining the voxels the first one resolved; the prediction is the first member's.")
        return replace(first, attribution=attribution, confidence=confidence, timings=timings,
                       warnings=list(dict.fromkeys(first.warnings + [note])),
                       ensemble={"members": names, "combine": "mean of the members' maps and confidences",
                                 "predictions": [run.prediction for run in runs]})

    def _spacing_warnings(self, volume: Volume) -> list[str]:
        expected = self.model.card.spacing_mm
        if expected is None:
            return []
        ratio = np.asarray(volume.spacing) / np.asarray(expected)
        if np.all(np.abs(ratio - 1.0) <= 0.1):
            return []
        return [f"Voxel spacing {tuple(round(s, 4) for s in volume.spacing)} mm differs from the "
                f"{tuple(expected)} mm model {self.model.card.name!r} was trained at; CTXAI does not resample, so "
                f"defects look {_scale_per_axis(1.0 / ratio)} their trained size. Resample the volume in Slicer "
                "for faithful results."]

    # ---------------------------------------------------------------------------------------- prediction
    def _run_model(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(self.device, self.precision):
            output = self.model(inputs.to(self.device)).float()
        self.model.check_activation(output, "the first tile of a real volume")
        return activate(output, self.model.card.output_activation)

    def _forward_batch(self, shape: tuple[int, ...], needed: int = _BATCH_LIMIT,
                       monitor: RunMonitor | None = None) -> int:
        """Tiles per forward-only batch (see :meth:`_forward_limit`)."""
        return self._fastest_batch(shape, self._forward_limit(shape), False, needed, monitor)

    def _forward_limit(self, shape: tuple[int, ...]) -> int:
        """The most tiles per forward-only batch: activations are freed layer by layer without autograd."""
        return self.budget.batch_size(self._sample_bytes(shape) // 2, _BATCH_LIMIT)

    def _fastest_batch(self, shape: tuple[int, ...], limit: int, backward: bool, needed: float,
                       monitor: RunMonitor | None = None) -> int:
        """The batch size, within the memory budget's ``limit``, with the lowest time per sample.

        The largest batch that fits is not the fastest: on a CPU a batch whose activations overflow the caches runs
        slower per sample than a small one, and a GPU needs a large batch to be busy. Sizes double until the time
        per sample clearly rises; measured once per patch shape and kind of pass, then kept with the model until a
        run shows the choice was wrong (:meth:`_recheck`).
        """
        search = self._batch_search(shape, backward, limit, needed)
        if isinstance(search, BatchSearch):
            self._measure_batches(tuple(shape), backward, search, monitor)
            self._keep_search(shape, backward, search)
            return search.best
        return search

    def _batch_search(self, shape: tuple[int, ...], backward: bool, limit: int, needed: float) -> int | BatchSearch:
        """The known batch size within ``limit``, or a search to run when none is known for it yet."""
        limit = int(max(1, min(limit, np.ceil(needed))))
        best, tried = self._fastest.get((tuple(shape), backward), (1, 1))[:2]
        if limit > 1 and tried < limit and best == tried:
            return BatchSearch(limit, needed)
        return max(1, min(best, limit))

    def _keep_search(self, shape: tuple[int, ...], backward: bool, search: BatchSearch) -> None:
        if search.tried:  # a pass over real tiles may end before the search does: what it measured is kept
            self._fastest[(tuple(shape), backward)] = (search.best, search.tried, search.best_time,
                                                       time.perf_counter() - search.started)

    def _recheck(self, shape: tuple[int, ...], backward: bool, samples: float, seconds: float) -> None:
        """Forget a batch choice when a run took far longer than it predicted (the machine got busier since, or was
        busy while measuring), by more than measuring again costs: the next run measures again. Per-call overheads
        of small models stay below that margin."""
        key = (tuple(shape), backward)
        choice = self._fastest.get(key)
        if choice is not None and seconds > _RECHECK * samples * choice[2] + choice[3]:
            del self._fastest[key]

    def _measure_batches(self, shape: tuple[int, ...], backward: bool, search: BatchSearch,
                         monitor: RunMonitor | None = None) -> None:
        """Run ``search`` (see :class:`~.runtime.BatchSearch`) on made-up input of the patch's shape."""
        def seconds(batch: int) -> float:
            if monitor is not None:
                monitor.check_cancel()  # the search runs real batches: Cancel must stop it like any other
            x = torch.randn((batch, self.model.card.input_channels) + shape, device=self.device,
                            requires_grad=backward)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            started = time.perf_counter()
            with torch.set_grad_enabled(backward), autocast(self.device, self.precision):
                out = self.model(x)
                if backward and out.requires_grad:  # a model without gradients is refused by the method itself
                    torch.autograd.grad(out.float().sum(), x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - started

        while not search.done:
            batch = search.next()
            try:
                search.record(batch, seconds(batch))
            except Exception as exc:  # noqa: BLE001 - out of memory ends the search, anything else is raised
                if not is_out_of_memory(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                search.out_of_memory()

    def _sample_bytes(self, shape: tuple[int, ...]) -> int:
        key = tuple(shape)
        if key not in self._per_sample:
            example = torch.zeros((1, self.model.card.input_channels) + key, device=self.device)
            self._per_sample[key] = activation_bytes(self.model.module, example) + example.numel() * 8
        return self._per_sample[key]

    def segmentation_probabilities(self, prepared: _Prepared, progress: ProgressCallback | None = None,
                                   cancel: CancelToken | None = None) -> np.ndarray:
        """Blended sliding-window class probabilities (classes, K, J, I) of the whole volume, cached.

        Kept as float16: a probability needs no more than its 5e-4 resolution, and these maps are the largest
        thing a run over a whole part holds besides the volume itself."""
        if prepared.probabilities is None:
            prepared.probabilities = self._predict(prepared, Box.whole(prepared.volume.shape), progress, cancel)
        return prepared.probabilities

    def _extent_probabilities(self, prepared: _Prepared, extent: Box, progress: ProgressCallback | None = None,
                              cancel: CancelToken | None = None) -> tuple[np.ndarray, Box]:
        """Blended class probabilities over ``extent`` and the box they cover: the whole volume's when it is
        predicted already, else only ``extent``'s, from the tiles that reach it (exact there), cached."""
        if prepared.probabilities is not None or extent == Box.whole(prepared.volume.shape):
            return self.segmentation_probabilities(prepared, progress, cancel), Box.whole(prepared.volume.shape)
        if extent not in prepared.extent_probabilities:
            prepared.extent_probabilities[extent] = self._predict(prepared, extent, progress, cancel)
        return prepared.extent_probabilities[extent], extent

    def _predict(self, prepared: _Prepared, box: Box, progress: ProgressCallback | None,
                 cancel: CancelToken | None) -> np.ndarray:
        grid = self._grid(prepared.volume.shape)
        tiles = len(grid.select(box))
        message = f"predicting (sliding window, {tiles} tiles)"
        monitor = RunMonitor(tiles, progress, cancel, message=message)
        monitor.report(message, 0.0)
        start = monitor.done

        def predict(limit: int) -> np.ndarray:
            # A first pass measures the batch size on its own tiles: no time on made-up input before it starts.
            batches = self._batch_search(grid.patch, False, limit, tiles)
            probabilities = predict_tiles(self._run_model, prepared.x, grid, box, batches, monitor.tick,
                                          dtype=np.float16)
            if isinstance(batches, BatchSearch):
                self._keep_search(grid.patch, False, batches)
            return probabilities

        probabilities = with_backoff(predict, self._forward_limit(grid.patch),
                                     on_retry=lambda _b: monitor.rewind(start))
        self._check_finite(probabilities, box)
        return probabilities

    def _check_cost(self, what: str, passes: float, backward: bool, extent: Box, warnings: list[str],
                    spec: MethodSpec | None = None, monitor: RunMonitor | None = None) -> float | None:
        """Estimate a run of ``passes`` tile passes over ``extent`` before it starts; refuse one that would take
        longer than ``time_limit_s`` or need more memory than the device has free (unless ``force``); warn when a model
        without a patch size takes the whole extent in one pass. Returns the estimated seconds (None: not timed,
        the run is shorter than timing it)."""
        patch = self.model.card.patch_shape
        probe = self.model.probe_shape()
        # A model that takes any size runs the whole extent at once: its cost is scaled from the probe patch
        # rather than learnt by running the giant pass.
        scale = 1.0 if patch is not None else float(np.prod(extent.shape)) / float(np.prod(probe))
        memory = self._sample_bytes(probe) * scale * (3 if backward else 1)
        # The budget only sizes batches (a pass of one beyond it still runs): the device's free memory is the limit.
        available = _available_bytes(self.device)
        if patch is None and scale > 1.0 and spec is not None:  # said once, for the method's passes
            giant = (f"Model {self.model.card.name!r} has no patch size, so each pass takes the whole "
                     f"{'x'.join(map(str, extent.shape))} (k,j,i) extent at once: about {memory / 2 ** 30:.2g} GiB "
                     f"of activations per {'forward and backward ' if backward else ''}pass (scaled from a "
                     f"{'x'.join(map(str, probe))} probe). Give 'patch_size' in a model card to tile it.")
            warnings.append(giant)
        seconds = None
        if passes >= _ESTIMATED_PASSES or scale > 1.0:
            seconds = passes * self._seconds_per_pass(probe, backward, monitor) * scale
        too_long = seconds is not None and seconds > self.time_limit_s
        if self.force or not (too_long or memory > available):
            return seconds
        knobs = [f"--set {s.name}=..." for s in (spec.settings if spec is not None else ()) if s.kind == "int"]
        figures = []
        if too_long:
            figures.append(f"would take about {_duration(seconds)} ({passes:.0f} model passes x "
                           f"{seconds / passes:.2g} s per pass measured on {self.device}), more than the "
                           f"{_duration(self.time_limit_s)} limit")
        if memory > available:
            figures.append(f"needs about {memory / 2 ** 30:.2g} GiB for one pass, more than the "
                           f"{available / 2 ** 30:.2g} GiB free on {self.device}")
        lower = ["a smaller ROI"] + (["a 'patch_size' in the model card (tiles instead of one pass)"]
                                     if patch is None else ["a smaller 'patch_size' or less 'sliding_window.overlap' "
                                                            "in the model card (or --overlap)"]) + knobs
        raise MethodError(f"{what} {' and '.join(figures)}. Lower it with {', '.join(lower)}, or run it anyway "
                          "with --force (force=True).")

    def _seconds_per_pass(self, shape: tuple[int, ...], backward: bool, monitor: RunMonitor | None = None) -> float:
        """Seconds of one forward (and backward) pass over one ``shape`` patch at batch 1: the batch search's
        measurement when there is one, else one timed pass after a warm-up, kept with the explainer."""
        key = (tuple(shape), backward)
        if key in self._fastest:
            return self._fastest[key][2]
        if key not in self._pass_seconds:
            x = torch.rand((1, self.model.card.input_channels) + tuple(shape), device=self.device,
                           requires_grad=backward)
            timed = []
            for _ in range(2):  # the first call selects kernels and allocates: only the second is timed
                if monitor is not None:
                    monitor.check_cancel()  # timed passes are real work: Cancel stops them like any other
                started = time.perf_counter()
                with torch.set_grad_enabled(backward), autocast(self.device, self.precision):
                    out = self.model(x)
                    if backward and out.requires_grad:
                        torch.autograd.grad(out.float().sum(), x)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                timed.append(time.perf_counter() - started)
            self._pass_seconds[key] = timed[-1]
        return self._pass_seconds[key]

    def _check_finite(self, output: np.ndarray, extent: Box) -> None:
        if _all_finite(output):
            return
        if output.ndim == 4:  # a segmentation map: name the first voxel, in IJK like every other place
            k, j, i = np.argwhere(~np.isfinite(output).any(axis=0))[0]
            where = f"first at voxel IJK ({i}, {j}, {k})"
        else:
            where = f"for the patch at IJK {tuple(extent.lo)}-{tuple(extent.hi)}"
        raise ModelError(f"Model {self.model.card.name!r} itself returns NaN or Inf on this input ({where}, "
                         f"{self.precision} precision on {self.device}). Check the model and the volume's "
                         "intensities against the card's normalisation.")

    def class_probabilities(self, prepared: _Prepared, extent: Box, monitor: RunMonitor | None = None) -> np.ndarray:
        """A classifier's class probabilities for the patch at ``extent`` (averaged over its tiles if larger);
        kept with the prepared volume, so that trying several methods on one defect predicts it once."""
        if extent in prepared.class_probabilities:
            return prepared.class_probabilities[extent]
        tiles = self._grid(prepared.volume.shape, extent).tiles
        total = 0.0
        for batch in batched(tiles, self._forward_batch(tiles[0].shape, len(tiles), monitor)):
            if monitor is not None:
                monitor.check_cancel()
            inputs = torch.cat([crop_padded(prepared.x, tile) for tile in batch])
            total = total + self._run_model(inputs).cpu().numpy().sum(axis=0)
        self._check_finite(total, extent)
        prepared.class_probabilities[extent] = total / len(tiles)
        return prepared.class_probabilities[extent]

    # -------------------------------------------------------------------------------------------- plan
    def _grid(self, shape: tuple[int, int, int], extent: Box | None = None) -> TileGrid:
        return TileGrid(shape, self.model.card.patch_shape, self.overlap, extent, self.halo, self.blend)

    def _plan(self, shape: tuple[int, int, int], target: ResolvedTarget) -> _Plan:
        card = self.model.card
        classes = len(card.class_names)
        channels = target.channel_weights(classes)
        if card.task == "classification":
            extent = self.patch_extent(target.box, shape)
            grid = self._grid(shape, extent)
            return _Plan(grid, grid.tiles, extent, channels)
        grid = self._grid(shape)
        shares = {}
        for tile in grid.select(target.box):
            region = target.region_weights(tile)
            if region is not None:
                shares[tile] = float((region * grid.importance(tile) / grid.normaliser(tile)).sum())
        # A region in an overlap zone touches many tiles, but the Gaussian blend gives most of them almost no say:
        # the tiles with the least say are left out while together they carry at most min_tile_share of the target.
        total, dropped, left_out = sum(shares.values()), 0.0, set()
        for tile, share in sorted(shares.items(), key=lambda item: item[1]):
            if dropped + share > self.min_tile_share * total:
                break
            dropped += share
            left_out.add(tile)
        kept = [t for t in shares if t not in left_out]
        return _Plan(grid, kept, grid.covering(kept), channels, target)

    def patch_extent(self, region: Box, shape: tuple[int, int, int]) -> Box:
        """A classifier's extent: the region grown to at least one patch, centred, moved inside the volume."""
        patch = self.model.card.patch_size
        if patch is None:
            return region
        lo, hi = [], []
        for axis, n in enumerate(reversed(shape)):
            a, b = region.lo[axis], region.hi[axis]
            if b - a < patch[axis]:
                a = (a + b - patch[axis]) // 2
                b = a + patch[axis]
            if n >= b - a:  # shift inside; a volume smaller than the patch keeps it padded around itself
                shift = max(0, -a) - max(0, b - n)
                a, b = a + shift, b + shift
            lo.append(a)
            hi.append(b)
        return Box(lo, hi).clip(shape) if all(n >= p for n, p in zip(reversed(shape), patch)) else Box(lo, hi)

    # ------------------------------------------------------------------------------------------ explain
    def explain(self, volume: Volume, method: str, target: Target | str | int | None = None,
                layer: str | None = None, settings: dict[str, Any] | None = None,
                progress: ProgressCallback | None = None, cancel: CancelToken | None = None, seed: int = 0,
                output: str = "full", evaluate: Evaluate | None = None) -> Explanation:
        """Explain ``target`` on ``volume`` with ``method``; blocking. See the module docstring.

        ``output="full"`` returns the map in the input's geometry (zero outside the computed extent);
        ``output="extent"`` returns only the extent, with its exact sub-box geometry. ``evaluate(probe, map)``, when
        given, measures the map over the extent (e.g. :func:`CTXAILib.checks.faithfulness.faithfulness_check`) and
        its dictionary becomes the explanation's ``quality``.
        """
        def again(volume_: Volume, target_: Target | None, output_: str = output,
                  explainer: Explainer = self, progress_: ProgressCallback | None = progress) -> Explanation:
            return explainer.explain(volume_, method, target_, layer, settings, progress_, cancel, seed, output_,
                                     evaluate)

        if self.model.members:
            return self._explain_members(volume, target, progress,
                                         lambda member, target_, progress_: again(volume, target_, explainer=member,
                                                                                  progress_=progress_))
        resampled = self.model_grid(volume)
        if resampled is not None:
            return self._explain_resampled(volume, *resampled, target, output, again)
        started = time.perf_counter()
        spec = get_method(method)
        values = spec.validate(settings)
        target = target if isinstance(target, Target) else Target(target)
        if output not in ("full", "extent"):
            raise InputError(f"output must be 'full' or 'extent', got {output!r}.")
        card = self.model.card
        if spec.segmentation_only and card.task != "segmentation":
            raise MethodError(f"{spec.label} is the segmentation model's own probability map; model {card.name!r} "
                              "is a classifier, whose class probabilities are in the prediction.")
        if spec.needs_hooks and not self.model.hookable:
            raise MethodError(f"{spec.label} hooks the model's layers. {self.model.hook_refusal()}")
        monitor = RunMonitor(callback=progress, cancel=cancel, message=spec.label)
        monitor.report("preparing input", 0.0)
        prepared = self.prepare(volume)
        warnings = list(self.model.warnings) + self._spacing_warnings(volume) + prepared.warnings
        shape = volume.shape
        timings = {"prepare_s": time.perf_counter() - started}

        probabilities = class_probs = predicted = None
        if card.task == "segmentation" and target.region.needs_prediction:
            # A clicked component can reach anywhere: the whole volume is predicted to find it (estimated only when
            # it is still to do: a kept prediction costs nothing, so it must not be refused as too long).
            if prepared.probabilities is None:
                self._check_cost("Predicting the whole volume", len(self._grid(shape).tiles), False,
                                 Box.whole(shape), warnings, monitor=monitor)
            probabilities, predicted = self.segmentation_probabilities(prepared, progress, cancel), Box.whole(shape)
            masks = self._class_masks(probabilities)
            if spec.family == "prediction":
                target = self._confidence_target(target, masks, warnings)
            resolved = target.resolve(card, shape, class_masks=masks)
        elif card.task == "segmentation":
            resolved = target.resolve(card, shape)
        else:
            def classify(box: Box) -> int:
                return int(np.argmax(self.class_probabilities(prepared, self.patch_extent(box, shape), monitor)))

            resolved = target.resolve(card, shape, classify=classify)
            class_probs = self.class_probabilities(prepared, self.patch_extent(resolved.box, shape), monitor)
        timings["predict_s"] = time.perf_counter() - started - timings["prepare_s"]

        plan = self._plan(shape, resolved)
        layer_module, layer_name = self._layer(spec, layer, plan.grid.patch)
        tiles_run = 1 if spec.aggregation == "volume" else len(plan.tiles)
        samples = spec.samples(values, plan.extent.shape)
        estimate = self._check_cost(spec.label, samples * len(plan.tiles), spec.needs_gradient, plan.extent,
                                    warnings, spec, monitor)
        if estimate is not None:
            timings["estimate_s"] = estimate
        if card.task == "segmentation" and probabilities is None:
            # Only the tiles that reach the target's region are predicted (all of them: the blend there is exact).
            probabilities, predicted = self._extent_probabilities(prepared, resolved.box, progress, cancel)
            timings["predict_s"] = time.perf_counter() - started - timings["prepare_s"]
        if spec.family == "prediction":  # the model's own map, over the target's region
            plan = dataclasses.replace(plan, extent=resolved.box)
        monitor.total = max(samples * tiles_run, 1.0)
        monitor.report(f"{spec.label}: {len(plan.tiles)} tile(s)", 0.0)

        t0 = time.perf_counter()
        baselines = _Baselines(prepared, plan.extent, volume.spacing)
        # LRP redistributes the logit; the other methods explain the target's score as asked.
        score = "logit" if spec.family == "relevance" else resolved.score
        activation = card.output_activation if score == "probability" else "none"
        if spec.aggregation == "volume":
            notes: list[str] = []
            # Predicted over the target's region only (the confidence method's extent); other methods need none.
            covered = probabilities is not None and plan.extent.intersect(predicted) == plan.extent
            extent_probabilities = None if not covered else \
                probabilities[(slice(None),) + plan.extent.offset([-v for v in predicted.lo]).slices]
            result = self._run_volume(spec, values, prepared, plan, resolved, activation, baselines, monitor, seed,
                                      extent_probabilities, notes)
            warnings += notes
        else:
            result = self._run_tiles(spec, values, prepared, plan, layer_module, activation, baselines, monitor, seed)
        timings["explain_s"] = time.perf_counter() - t0
        warnings += baselines.warnings()
        if spec.absolute:  # a tile method's map is the run's own array: no copy of a large map
            result = np.abs(result, out=result if spec.aggregation != "volume" else None)
        # One map per voxel: the input channels' attributions add up (one channel: no copy of a large map).
        result = result[0] if result.shape[0] == 1 else result.sum(axis=0)
        if not _all_finite(result):
            hint = "try fp32 precision or other settings" if self.precision != "fp32" else "try other settings"
            raise MethodError(f"{spec.label} produced non-finite values on this input (numerical overflow); "
                              f"{hint}.")
        if not result.any():
            warnings.append(f"The {spec.label} map is zero everywhere: the target did not change with anything the "
                            "method tried. Check the intensity warnings above, the target (class, region) and the "
                            "settings (baseline, window) before reading anything into it.")
        scores = {}
        if evaluate is not None and spec.family != "prediction":
            monitor.report("measuring the map's quality")
            probe = Probe(baselines.x, self._tiled_forward(plan, activation, monitor), baselines.extent,
                          self._volume_batch(plan, monitor=monitor), values, seed)
            scores = evaluate(probe, result)
            timings["quality_s"] = time.perf_counter() - t0 - timings["explain_s"]

        extent = plan.extent.clip(shape)
        if extent != plan.extent:  # a volume smaller than the patch: its padding is not part of the map
            result = result[extent.offset([-v for v in plan.extent.lo]).slices]
        result = result.astype(np.float32, copy=False)
        if extent == Box.whole(shape):  # a whole part: the map is the output, no copies of volume size
            attribution = volume.with_array(result)
        else:
            extent_volume = volume.crop(extent).with_array(result)
            attribution = volume.embed(extent_volume, extent) if output == "full" else extent_volume
        confidence = runner_up = None
        if probabilities is not None:
            confidence = self._confidence_volume(volume, probabilities[resolved.class_index], predicted, output)
            prediction = self._segmentation_summary(probabilities, resolved, predicted, shape)
        else:
            runner_up = next((card.class_names[int(i)] for i in np.argsort(-class_probs)
                              if int(i) != resolved.class_index), None)
            prediction = {"task": "classification", "predicted_class": card.class_names[int(np.argmax(class_probs))],
                          "probabilities": {n: float(p) for n, p in zip(card.class_names, class_probs)},
                          "target_probability": float(class_probs[resolved.class_index])}
        timings["total_s"] = time.perf_counter() - started
        monitor.report("done", 1.0)
        return Explanation(
            attribution=attribution, method=spec.name, settings=values, sign=spec.sign, family=spec.family,
            target={"class": card.class_names[resolved.class_index],
                    "contrast": None if resolved.contrast_index is None else card.class_names[resolved.contrast_index],
                    "score": score, "region": target.region.describe(), "region_spec": target.region.spec(),
                    "box": [list(resolved.box.lo), list(resolved.box.hi)]},
            layer=layer_name, prediction=prediction, extent=extent, confidence=confidence, timings=timings,
            device=str(self.device), precision=self.precision, input_sha256=prepared.sha256, warnings=warnings,
            quality=scores, normalization=_applied(card.normalization, prepared.normalization),
            fixed_target=resolved.fixed(), runner_up=runner_up, seed=seed, output=output,
            window={"overlap": self.overlap, "blend": self.blend, "halo": self.halo,
                    "min_tile_share": self.min_tile_share, "memory_mb": self.budget.bytes / 2 ** 20,
                    "tiles": len(plan.tiles),
                    **({} if predicted is None else
                       {"predicted_ijk": {"lo": list(predicted.lo), "hi": list(predicted.hi)}})})

    def class_mask(self, volume: Volume, class_index: int) -> np.ndarray:
        """A segmentation model's predicted mask (k, j, i) of one class over the whole volume (cached prediction)."""
        if self.model.card.task != "segmentation":
            raise MethodError(f"Model {self.model.card.name!r} is a classifier: it predicts no mask.")
        if self.model.members:
            members = self._members or [self.variant(member) for member in self.model.members]
            self._members = members
            mean = sum(member._input_probabilities(volume) for member in members) / np.float32(len(members))
            return self._class_masks(mean)(class_index)
        return self._class_masks(self._input_probabilities(volume))(class_index)

    def _input_probabilities(self, volume: Volume) -> np.ndarray:
        """Segmentation probabilities (classes, K, J, I) on the input's grid (resampled back if the card asks)."""
        resampled = self.model_grid(volume)
        if resampled is None:
            return self.segmentation_probabilities(self.prepare(volume))
        grid, model_volume = resampled
        return grid.to_input(self.segmentation_probabilities(self.prepare(model_volume)), volume).array

    def _class_masks(self, probabilities: np.ndarray) -> Callable[[int], np.ndarray]:
        def mask(index: int) -> np.ndarray:
            if self.model.card.output_activation != "softmax":
                return probabilities[index] > 0.5
            # Slab by slab: argmax's int64 labels of a whole part would take twice the probabilities' memory.
            mask = np.empty(probabilities.shape[1:], bool)
            for k in range(0, mask.shape[0], 16):
                mask[k:k + 16] = probabilities[:, k:k + 16].argmax(axis=0) == index
            return mask
        return mask

    def _segmentation_summary(self, probabilities: np.ndarray, target: ResolvedTarget, predicted_box: Box,
                              shape: tuple[int, int, int]) -> dict[str, Any]:
        """The prediction in the target's region; ``probabilities`` cover ``predicted_box`` of a volume of
        ``shape``, and the count of predicted voxels is over that box (the volume's, or the extent's)."""
        card = self.model.card
        box = target.box.offset([-v for v in predicted_box.lo])
        p = probabilities[target.class_index][box.slices]
        inside = p if target.mask is None else p[target.mask]
        predicted = self._class_masks(probabilities)(target.class_index)
        where = "volume" if predicted_box == Box.whole(shape) else "extent"
        return {"task": "segmentation", "class": card.class_names[target.class_index],
                "region_voxels": int(inside.size),
                "predicted_voxels_in_region": int((predicted[box.slices] if target.mask is None
                                                   else predicted[box.slices][target.mask]).sum()),
                "mean_probability_in_region": float(inside.mean()), "max_probability_in_region": float(inside.max()),
                f"predicted_voxels_in_{where}": int(predicted.sum())}

    @staticmethod
    def _confidence_volume(volume: Volume, probability: np.ndarray, predicted_box: Box, output: str) -> Volume:
        """The target class's probability over what was predicted: NaN ("not predicted") elsewhere in the full
        geometry, or only the predicted box with ``output="extent"``."""
        if output == "extent" and predicted_box != Box.whole(volume.shape):
            return volume.crop(predicted_box).with_array(np.ascontiguousarray(probability, np.float32))
        # Placed: made as float32 (and NaN outside the box) only when read; a file is written from the parts.
        return PlacedVolume(volume, probability, predicted_box, fill=np.nan)

    def _confidence_target(self, target: Target, masks: Callable[[int], np.ndarray], warnings: list[str]) -> Target:
        """The confidence map needs no predicted component: a click outside one shows it over one patch (32³
        for a model that takes any size) around the voxel."""
        index = self.model.card.class_index(target.class_name) if target.class_name is not None else (
            1 if len(self.model.card.class_names) > 1 else 0)
        i, j, k = (int(round(v)) for v in target.region.ijk)
        mask = masks(index)
        if not (0 <= k < mask.shape[0] and 0 <= j < mask.shape[1] and 0 <= i < mask.shape[2]) or mask[k, j, i]:
            return target  # outside the volume the region says so; inside a component the component is the region
        warnings.append(f"No predicted region of class {self.model.card.class_names[index]!r} at voxel "
                        f"{(i, j, k)} (i,j,k): the confidence map covers one patch around that voxel.")
        limit = tuple(reversed(mask.shape))
        size = tuple(min(s, n) for s, n in zip(reversed(self.model.probe_shape()), limit))
        lo = [max(0, min(v - s // 2, n - s)) for v, s, n in zip((i, j, k), size, limit)]
        return dataclasses.replace(target, region=BoxRegion(Box(lo, [a + s for a, s in zip(lo, size)])))

    def _layer(self, spec: MethodSpec, name: str | None, patch: tuple[int, int, int]) -> tuple[nn.Module | None, str | None]:
        if not spec.needs_layer:
            return None, None
        name = name or self.model.default_layer()
        module = self.model.get_layer(name)
        info = {i.name: i for i in self.model.layers(patch)}.get(name)
        if info is None or not info.spatial:
            shape = None if info is None else info.output_shape
            raise LayerError(f"Layer {name!r} outputs {shape}, not a 3-D feature map (N, C, D, H, W), so "
                             f"{spec.label} cannot use it. Pick a convolution layer (`ctxai layers` lists them).")
        if all(n == 1 for n in info.output_shape[2:]):
            raise LayerError(f"Layer {name!r} outputs a 1x1x1 feature map {info.output_shape} for a {patch} patch: "
                             f"it has no spatial extent, so {spec.label} would paint the patch flat. Pick an "
                             "earlier convolution layer (`ctxai layers` lists them with their shapes).")
        return module, name

    def _run_tiles(self, spec: MethodSpec, values: dict, prepared: _Prepared, plan: _Plan, layer: nn.Module | None,
                   activation: str, baselines: _Baselines, monitor: RunMonitor, seed: int) -> np.ndarray:
        total = np.zeros((prepared.x.shape[1],) + plan.extent.shape, np.float32)
        weight_sum = np.zeros(plan.extent.shape, np.float32) if spec.aggregation == "blend" else None
        per_sample = self._sample_bytes(plan.grid.patch) * 3  # activations + their gradients + the input's
        batch = self._fastest_batch(plan.grid.patch, self.budget.batch_size(per_sample, _BATCH_LIMIT), True,
                                    spec.samples(values, plan.grid.patch), monitor)
        started, done = time.perf_counter(), monitor.done

        def run_tile(index: int, kernel: Callable, statistics: torch.Tensor | None) -> torch.Tensor:
            tile, weights = plan.tiles[index], plan.weights(index)
            x = crop_padded(prepared.x, tile).to(self.device)
            score = ScoreModel(self.model.module, weights.to(self.device), activation, monitor, self.precision)
            start = monitor.done

            def run(batch_size: int) -> torch.Tensor:
                ctx = TileContext(x=x, score=score, model=self.model, layer=layer,
                                  baseline=lambda kind, sigma=2.0: baselines.crop(kind, sigma, tile).to(self.device),
                                  batch_size=batch_size, seed=seed + index, statistics=statistics)
                return kernel(ctx, values)

            return with_backoff(run, batch, on_retry=lambda _b: monitor.rewind(start))

        statistics = None
        if spec.statistics is not None and len(plan.tiles) > 1:
            monitor.total += len(plan.tiles)  # one more pass: the whole target's statistics first
            statistics = sum(run_tile(index, spec.statistics, None).detach() for index in range(len(plan.tiles)))
        for index, tile in enumerate(plan.tiles):
            values_np = run_tile(index, spec.kernel, statistics).detach().float().cpu().numpy()
            if spec.aggregation == "sum":
                TileGrid.accumulate(total[:values_np.shape[0]], plan.extent, tile, values_np)
            else:
                blend = plan.grid.blend_weights(tile)
                TileGrid.accumulate(total[:values_np.shape[0]], plan.extent, tile, values_np * blend)
                TileGrid.accumulate(weight_sum, plan.extent, tile, blend)
        if spec.aggregation == "blend":
            total /= np.maximum(weight_sum, 1e-12, out=weight_sum)
        self._recheck(plan.grid.patch, True, monitor.done - done, time.perf_counter() - started)
        return total

    def _tiled_forward(self, plan: _Plan, activation: str, monitor: RunMonitor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The target score of the sliding-window model over ``plan.extent``: (N, C, *extent) -> (N,)."""
        tiles = [tile.offset([-v for v in plan.extent.lo]) for tile in plan.tiles]
        # One tile's weights at a time: kept for the next call only when every tile's fit in a small share of memory.
        keep = len(tiles) * self._weight_bytes(plan) <= self.budget.bytes // 16
        cache: dict[int, torch.Tensor] = {}

        def weights(index: int) -> torch.Tensor:
            if index in cache:
                return cache[index]
            w = plan.weights(index).to(self.device)
            if keep:
                cache[index] = w
            return w

        def forward(batch: torch.Tensor) -> torch.Tensor:
            monitor.tick(batch.shape[0])
            scores = torch.zeros(batch.shape[0])
            for index, tile in enumerate(tiles):
                with torch.no_grad(), autocast(self.device, self.precision):
                    out = self.model(crop_padded(batch, tile).to(self.device))
                scores += (activate(out.float(), activation) * weights(index)).flatten(1).sum(1).cpu()
            return scores

        return forward

    def _weight_bytes(self, plan: _Plan) -> int:
        return len(self.model.card.class_names) * int(np.prod(plan.grid.patch)) * 4 if plan.target is not None else 0

    def _volume_batch(self, plan: _Plan, needed: float = _BATCH_LIMIT, monitor: RunMonitor | None = None) -> int:
        """Perturbed copies of the extent per call: their tiles' activations plus the copies themselves."""
        extent_bytes = int(np.prod(plan.extent.shape)) * self.model.card.input_channels * 4
        limit = self.budget.batch_size(self._sample_bytes(plan.grid.patch) // 2 + extent_bytes, _BATCH_LIMIT)
        return self._fastest_batch(plan.grid.patch, limit, False, needed, monitor)

    def _run_volume(self, spec: MethodSpec, values: dict, prepared: _Prepared, plan: _Plan, target: ResolvedTarget,
                    activation: str, baselines: _Baselines, monitor: RunMonitor, seed: int,
                    probabilities: np.ndarray | None, notes: list[str]) -> np.ndarray:
        """A volume-aggregated method over ``plan.extent``; ``probabilities`` (classes, *extent) are the blended
        predictions over that extent (segmentation)."""
        forward = self._tiled_forward(plan, activation, monitor)
        crop = None if probabilities is None else (lambda: probabilities)
        tiles = [(tile.offset([-v for v in plan.extent.lo]),
                  lambda index=index: ScoreModel(self.model.module, plan.weights(index).to(self.device), activation,
                                                 monitor, self.precision))
                 for index, tile in enumerate(plan.tiles)]
        start = monitor.done

        def run(batch_size: int) -> torch.Tensor:
            del notes[:]
            ctx = VolumeContext(x=baselines.x, forward=forward, baseline=baselines.extent, batch_size=batch_size,
                                seed=seed, spacing=prepared.volume.spacing, target=target, probabilities=crop,
                                tiles=tiles, tick=monitor.tick, notes=notes)
            return spec.kernel(ctx, values)

        batch = self._volume_batch(plan, spec.samples(values, plan.extent.shape), monitor)
        return with_backoff(run, batch, on_retry=lambda _b: monitor.rewind(start)).detach().float().cpu().numpy()


class _Baselines:
    """Baselines computed once over the extent (so blur and part mean see the whole part) and cropped per tile.

    The normalised extent is made only when something needs all of it (a blurred or part-mean baseline, a
    volume method, a quality check): over a whole part it is another part-sized array. A constant baseline (zeros,
    air) is made tile by tile."""

    def __init__(self, prepared: _Prepared, extent: Box, spacing: tuple[float, float, float]):
        self.prepared = prepared
        self.extent_box = extent
        self.air = prepared.air
        self.spacing = spacing
        self._cache: dict[tuple[str, float], torch.Tensor] = {}
        self._constants: set[str] = set()

    @functools.cached_property
    def x(self) -> torch.Tensor:
        """The normalised input over the extent, (1, C, *extent)."""
        return crop_padded(self.prepared.x, self.extent_box)

    def extent(self, kind: str, sigma_mm: float = 2.0) -> torch.Tensor:
        key = (kind, float(sigma_mm))
        if key not in self._cache:
            self._cache[key] = make_baseline(kind, self.x, self.air, self.spacing, sigma_mm)
        return self._cache[key]

    def crop(self, kind: str, sigma_mm: float, tile: Box) -> torch.Tensor:
        if kind in _CONSTANT_BASELINES:
            self._constants.add(kind)
            return torch.full((1, self.prepared.x.shape[1]) + tile.shape, self._constant(kind))
        return crop_padded(self.extent(kind, sigma_mm), tile.offset([-v for v in self.extent_box.lo]))

    def _constant(self, kind: str) -> float:
        return 0.0 if kind == "zeros" else float(self.air)

    def _range(self) -> tuple[float, float]:
        """The normalised extent's smallest and largest value, read slab by slab unless it is made already."""
        if "x" in self.__dict__:
            return float(self.x.min()), float(self.x.max())
        box, lo, hi = self.extent_box, np.inf, -np.inf
        for k in range(box.lo[2], box.hi[2], 16):
            slab = crop_padded(self.prepared.x, Box(box.lo[:2] + (k,), box.hi[:2] + (min(k + 16, box.hi[2]),)))
            lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
        return lo, hi

    def warnings(self) -> list[str]:
        """A warning per baseline the run used that is the input itself, within a thousandth of the input's range
        (a uniform volume's part mean, a blur over huge voxels): attributions against it are all zero."""
        if not self._cache and not self._constants:
            return []
        lo, hi = self._range()
        scale = (hi - lo) or 1.0
        differences = {kind: float((baseline - self.x).abs().max()) for (kind, _), baseline in self._cache.items()}
        differences.update({kind: max(abs(self._constant(kind) - lo), abs(self._constant(kind) - hi))
                            for kind in self._constants})
        return [f"The {kind.replace('_', ' ')} baseline equals the input here (largest difference {difference:.2g}), "
                "so the map is zero everywhere. Choose another baseline (--set baseline=..., listed by "
                "`ctxai methods`)." for kind, difference in differences.items() if difference <= 1e-3 * scale]
