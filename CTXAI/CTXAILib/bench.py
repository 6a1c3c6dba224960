"""``ctxai bench``: how fast and how lean the engine explains, measured against the plain cost of the model passes
each method needs and against Captum and MONAI used as their documentation shows (GitHub issue "Performance").

Cases, on the bundled models and a synthetic part (seed :data:`BENCH_SEED`, which training and evaluation never use):

1. the classifier on its 32³ patch centred on the largest pore, target "pore": :data:`CLASSIFIER_METHODS`;
2. occlusion (:data:`OCCLUSION`) of the classifier on a 48³ patch, which a copy of its card makes one tile, by each
   of the engine's occlusion engines (:data:`OCCLUSION_ENGINES`);
3. the U-Net over whole parts of 128³ and 256³ voxels through the engine's sliding window, target "void" summed
   over the whole volume: :data:`UNET_METHODS_CPU` on a CPU (one 64³ forward and backward takes about a second
   there, and 256³ has 125 tiles), :data:`UNET_METHODS_CUDA` on a GPU.

Every case runs in two child processes (``python -m CTXAILib.bench --child ...``) so that a peak of memory belongs
to one thing. The *memory* child runs the engine once in a fresh process: its peak resident set is the engine's, its
time the cold first run. The *timing* child warms up, then times, repeat by repeat and in this order, the engine,
the limit, Captum and MONAI, so that the slow drifts of a shared machine hit them alike.

The *limit* of a run is the plain cost of the model passes it needs: the registry's estimate of model evaluations
times the tiles times the raw network's time per sample (forward, and backward from the target logit with the input
requiring its gradient; forward only for perturbation methods and the prediction), at the batch size of
:data:`BATCHES` that is fastest per sample.

The JSON report holds the machine, every setting, every time and peak; its ``criteria`` section checks the issue's
targets against the measured numbers, unadjusted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from . import errors
from .errors import CTXAIError, InputError

if TYPE_CHECKING:
    from .explain import Explainer
    from .geometry import Box, Volume
    from .targets import Target

__all__ = ["BENCH_SEED", "CLASSIFIER_METHODS", "UNET_METHODS_CPU", "UNET_METHODS_CUDA", "OCCLUSION",
           "OCCLUSION_ENGINES", "BATCHES", "Case", "plan_cases", "run_bench", "format_table", "add_parser"]

BENCH_SEED = 777
"""Phantom seed: below training's seeds (from 1000 up) and far from the held-out ones (from 900 000 up)."""

CLASSIFIER_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("gradcam", {}), ("gradcam_plus_plus", {}), ("saliency", {}), ("integrated_gradients", {"steps": 32}),
    ("smoothgrad", {"samples": 16}), ("gradient_shap", {"samples": 16}), ("deeplift", {}), ("lrp", {}),
    ("lime", {"samples": 500}))
UNET_METHODS_CPU = ("saliency", "gradcam", "confidence")
UNET_METHODS_CUDA = tuple(name for name, _ in CLASSIFIER_METHODS) + ("confidence",)
OCCLUSION = {"window": 8, "stride": 4}
OCCLUSION_ENGINES = ("exhaustive", "incremental")
BATCHES = (1, 2, 4, 8, 16, 32)
"""Batch sizes tried for the limit's fastest time per sample."""

_CLASSIFIER_SHAPE = 128  # the phantom the classifier patches are cut from: the shape the models were trained on
_UNET_SHAPES = (128, 256)
_OCCLUSION_PATCH = 48
_QUICK_SHAPE = 64
_QUICK_CLASSIFIER = (("gradcam", {}), ("integrated_gradients", {"steps": 4}))
_QUICK_OCCLUSION = {"window": 16, "stride": 16}
_QUICK_UNET = ("saliency",)
_QUICK_BATCHES = (1, 2)
# Stop trying larger batches once one batch takes this long: on a CPU a 3-D network is already compute-bound there,
# and the search would cost more than the run it bounds.
_SEARCH_BATCH_S = 4.0
_MONAI_OCCLUSION_BATCH = 16  # OcclusionSensitivity's own default n_batch
_MONAI_SW_BATCH = 4          # sw_batch_size of MONAI's sliding-window tutorials
_CPU_SKIP = ("one 64³ U-Net forward and backward takes about a second on a CPU and a 256³ part has 125 tiles; "
             "the CPU run keeps the cheap methods, a CUDA run covers them all")
_CAPTUM_MISSING = {
    "gradcam_plus_plus": "Captum has no Grad-CAM++",
    "lrp": "Captum's LRP has no rules for Conv3d, BatchNorm3d or AdaptiveAvgPool3d (CTXAI's 3-D LRP is its own)",
    "confidence": "the prediction is not an attribution; Captum has no inference path",
}


# ----------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One benchmark case: a model on a phantom, a method, and the engine variants to time (one table row each).

    ``variants`` are ``{"row": name, "settings": {...}, "heavy": bool}``; a heavy variant (and heavy references)
    runs once, after a light warm-up, on a CPU. The fields after ``heavy_references`` are filled in when it runs.
    """

    name: str
    model: str                  # "classifier", "classifier48" (its card with a 48³ patch) or "unet"
    shape: int                  # edge of the phantom, voxels
    method: str
    variants: list[dict[str, Any]]
    heavy_references: bool = False
    card: str = ""
    volume: str = ""
    target: dict[str, Any] = field(default_factory=dict)  # {"class": name, "voxel": [i, j, k] or None}
    device: str = "cpu"
    precision: str = "fp32"
    repeats: int = 3
    batches: list[int] = field(default_factory=lambda: list(BATCHES))

    @property
    def rows(self) -> list[str]:
        return [v["row"] for v in self.variants]


def plan_cases(device_type: str, quick: bool = False) -> tuple[list[Case], list[dict[str, str]]]:
    """The cases for a device type ("cpu" or "cuda") and the U-Net rows left out there, with the reason."""
    cpu = device_type == "cpu"
    shape = _QUICK_SHAPE if quick else _CLASSIFIER_SHAPE
    classifier = _QUICK_CLASSIFIER if quick else CLASSIFIER_METHODS
    occlusion = _QUICK_OCCLUSION if quick else OCCLUSION
    cases = [Case(f"classifier-{name}", "classifier", shape, name,
                  [{"row": f"classifier-{name}", "settings": dict(settings), "heavy": False}])
             for name, settings in classifier]
    cases.append(Case("occlusion", "classifier48", shape, "occlusion",
                      [{"row": f"occlusion-{engine}", "settings": {**occlusion, "engine": engine},
                        "heavy": cpu and engine == "exhaustive"} for engine in OCCLUSION_ENGINES],
                      heavy_references=cpu))
    settings = dict(CLASSIFIER_METHODS)
    skipped = []
    for size in ((_QUICK_SHAPE,) if quick else _UNET_SHAPES):
        heavy = cpu and size >= 256
        wanted = _QUICK_UNET if quick else (UNET_METHODS_CPU if cpu else UNET_METHODS_CUDA)
        for name in UNET_METHODS_CUDA:
            row = f"unet{size}-{name}"
            if name in wanted:
                cases.append(Case(row, "unet", size, name,
                                  [{"row": row, "settings": dict(settings.get(name, {})), "heavy": heavy}],
                                  heavy_references=heavy))
            elif not quick:
                skipped.append({"row": row, "reason": _CPU_SKIP})
    return cases, skipped


def _select(cases: list[Case], patterns: Sequence[str] | None, skipped: list[dict[str, str]]) -> list[Case]:
    """The cases whose rows contain one of ``patterns`` (all without patterns), each with those rows only."""
    if not patterns:
        return cases
    rows = [row for case in cases for row in case.rows]
    unmatched = [p for p in patterns if not any(p in row for row in rows)]
    if unmatched:
        left_out = [s["row"] for s in skipped if any(p in s["row"] for p in unmatched)]
        hint = f" ({', '.join(left_out)} left out on this device: {skipped[0]['reason']})" if left_out else ""
        raise InputError(f"No benchmark case matches {', '.join(map(repr, unmatched))}{hint}. Available cases: "
                         f"{', '.join(rows)}. Give --cases as comma-separated parts of these names.")
    chosen = []
    for case in cases:
        variants = [v for v in case.variants if any(p in v["row"] for p in patterns)]
        if variants:
            chosen.append(replace(case, variants=variants))
    return chosen


# --------------------------------------------------------------------------------------------- measuring
def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _elapsed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (the GPU's queue drained before and after) and its result."""
    _sync(device)
    started = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - started, result


def _rss_mib(max_rss: int) -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return max_rss / (2**20 if sys.platform == "darwin" else 2**10)


def _own_peak_mib(field: str = "VmHWM") -> float | None:
    """This process's peak (VmHWM) or current (VmRSS) resident memory from /proc, in MiB.

    Linux carries a parent's high-water mark into ru_maxrss across fork and exec, so a child of a parent that
    generated a 256³ phantom would report the parent's peak; /proc's counters belong to the child's own memory."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _counting(module, counts: list[int]) -> Iterator[None]:
    """Record the batch size of every call of ``module``: how many samples a run pushed through the network."""
    handle = module.register_forward_hook(lambda _m, inputs, _o: counts.append(int(inputs[0].shape[0])))
    try:
        yield
    finally:
        handle.remove()


@dataclass
class _Measure:
    """One timed thing of a timing child: ``run()`` returns its seconds; ``warm()`` prepares it untimed."""

    key: str
    run: Callable[[], float]
    warm: Callable[[], Any] | None
    warm_up: str
    repeats: int
    times: list[float] = field(default_factory=list)
    cuda_peaks: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {"times_s": self.times, "repeats": self.repeats, "warm_up": self.warm_up,
                "cuda_peak_mib": max(self.cuda_peaks) if self.cuda_peaks else None, **self.extra}


class _Limit:
    """The plain cost of a run's model passes: ``passes`` times the raw network's best time per sample."""

    def __init__(self, network, x, class_index: int, gradient: bool, passes: float, batches: Sequence[int],
                 device, precision: str):
        self.network, self.x, self.class_index = network, x, class_index
        self.gradient, self.passes, self.device, self.precision = gradient, passes, device, precision
        self.batches = [b for b in batches if b <= max(1.0, passes)] or [1]
        self.per_sample: dict[int, float] = {}
        self.best = 1

    def _once(self, batch: int) -> float:
        import torch

        from .runtime import autocast

        x = self.x.expand(batch, *self.x.shape[1:]).clone().requires_grad_(self.gradient)

        def step() -> None:
            with torch.set_grad_enabled(self.gradient), autocast(self.device, self.precision):
                output = self.network(x)
            if self.gradient:
                output[:, self.class_index].float().sum().backward()

        return _elapsed(step, self.device)[0]

    def search(self) -> None:
        """Time each batch size (best of two) until one runs out of memory or takes too long."""
        from .runtime import is_out_of_memory

        for batch in self.batches:
            try:
                seconds = min(self._once(batch), self._once(batch))
            except Exception as exc:  # noqa: BLE001 - out of memory ends the search, anything else is a bug
                if not is_out_of_memory(exc):
                    raise
                break
            self.per_sample[batch] = seconds / batch
            if seconds / batch < self.per_sample.get(self.best, float("inf")):
                self.best = batch
            if seconds > _SEARCH_BATCH_S:
                break

    def run(self) -> float:
        return self._once(self.best) / self.best * self.passes

    def describe(self) -> dict[str, Any]:
        return {"pass": "forward+backward" if self.gradient else "forward", "passes": self.passes,
                "best_batch": self.best, "per_sample_s_by_batch": {str(b): s for b, s in self.per_sample.items()}}


# ------------------------------------------------------------------------------------------ references
@dataclass
class _Reference:
    """A library's own call for one input: ``fn(x, tile)`` on one tile, or on the whole extent (``per_tile``
    False)."""

    call: str
    fn: Callable[..., Any]
    per_tile: bool = True


@dataclass
class _Inputs:
    """What the reference calls get: the raw network (and its class sums for segmentation), the engine's
    normalised input over the extent, the CAM layer and the method's settings."""

    network: Any
    forward: Any
    layer: Any
    layer_name: str | None
    class_index: int
    values: dict[str, Any]
    x: Any                                  # (1, C, *extent) normalised, CPU
    extent: Any                             # Box
    patch: tuple[int, int, int]
    air: float
    spacing: tuple[float, float, float]
    overlap: float
    segmentation: bool
    device: Any

    def baseline(self, kind: str):
        from .baselines import make_baseline

        sigma = self.values.get("blur_sigma_mm", 2.0)
        return make_baseline(kind, self.x, self.air, self.spacing, sigma).to(self.device)

    def crop(self, tensor, tile):
        from .sliding import crop_padded

        return crop_padded(tensor, tile.offset([-v for v in self.extent.lo]))

    def noise(self, x) -> float:
        return float(self.values["noise"] * (x.max() - x.min()).clamp_min(1e-6))


def _unchanged(x):
    return x


def _captum_gradcam(r: _Inputs) -> _Reference:
    from captum.attr import LayerAttribution, LayerGradCam

    return _Reference("LayerGradCam(model, layer).attribute(x, target) + LayerAttribution.interpolate(cam, "
                      "x.shape[2:], 'trilinear')",
                      lambda x, tile: LayerAttribution.interpolate(
                          LayerGradCam(r.forward, r.layer).attribute(x, target=r.class_index), tuple(x.shape[2:]),
                          "trilinear"))


def _captum_saliency(r: _Inputs) -> _Reference:
    from captum.attr import Saliency

    return _Reference("Saliency(model).attribute(x, target)",
                      lambda x, tile: Saliency(r.forward).attribute(x, target=r.class_index))


def _captum_integrated_gradients(r: _Inputs) -> _Reference:
    from captum.attr import IntegratedGradients

    baseline, steps = r.baseline(r.values["baseline"]), r.values["steps"]
    return _Reference(f"IntegratedGradients(model).attribute(x, baselines, target, n_steps={steps})",
                      lambda x, tile: IntegratedGradients(r.forward).attribute(
                          x, baselines=r.crop(baseline, tile), target=r.class_index, n_steps=steps))


def _captum_smoothgrad(r: _Inputs) -> _Reference:
    from captum.attr import NoiseTunnel, Saliency

    samples = r.values["samples"]
    return _Reference(f"NoiseTunnel(Saliency(model)).attribute(x, nt_type='smoothgrad', nt_samples={samples}, "
                      "stdevs, target)",
                      lambda x, tile: NoiseTunnel(Saliency(r.forward)).attribute(
                          x, nt_type="smoothgrad", nt_samples=samples, stdevs=r.noise(x), target=r.class_index))


def _captum_gradient_shap(r: _Inputs) -> _Reference:
    import torch
    from captum.attr import GradientShap

    from .baselines import baseline_distribution

    samples = r.values["samples"]
    distribution = baseline_distribution(r.baseline, r.values["baselines"], torch.Generator().manual_seed(0))
    return _Reference(f"GradientShap(model).attribute(x, baselines, n_samples={samples}, stdevs, target)",
                      lambda x, tile: GradientShap(r.forward).attribute(
                          x, baselines=r.crop(distribution, tile), n_samples=samples, stdevs=r.noise(x),
                          target=r.class_index))


def _captum_deeplift(r: _Inputs) -> _Reference:
    from captum.attr import DeepLift

    baseline = r.baseline(r.values["baseline"])
    return _Reference("DeepLift(model).attribute(x, baselines, target)",
                      lambda x, tile: DeepLift(r.forward).attribute(x, baselines=r.crop(baseline, tile),
                                                                    target=r.class_index))


def _captum_lime(r: _Inputs) -> _Reference | str:
    if r.segmentation:
        return ("Captum's Lime perturbs one model input; the U-Net takes 64³ tiles, and a tiled forward would be "
                "CTXAI's own sliding window, not Captum's")
    import torch
    from captum.attr import Lime

    from .supervoxels import supervoxels

    fill, samples = r.baseline(r.values["fill"]), r.values["samples"]
    mask = torch.from_numpy(supervoxels(r.x[0].numpy(), r.spacing, r.values["supervoxels"],
                                        r.values["compactness"]))[None, None].to(r.device)
    return _Reference(f"Lime(model).attribute(x, target, feature_mask=<the same supervoxels>, n_samples={samples}, "
                      "baselines)",
                      lambda x, tile: Lime(r.forward).attribute(x, target=r.class_index, feature_mask=mask,
                                                                n_samples=samples, baselines=fill), per_tile=False)


def _captum_occlusion(r: _Inputs) -> _Reference:
    from captum.attr import Occlusion

    fill, channels = r.baseline(r.values["fill"]), r.x.shape[1]
    window, stride = (channels,) + (r.values["window"],) * 3, (channels,) + (r.values["stride"],) * 3
    return _Reference(f"Occlusion(model).attribute(x, sliding_window_shapes={window}, strides={stride}, baselines, "
                      "target)",
                      lambda x, tile: Occlusion(r.forward).attribute(x, sliding_window_shapes=window, strides=stride,
                                                                     baselines=fill, target=r.class_index),
                      per_tile=False)


_CAPTUM: dict[str, Callable[[_Inputs], _Reference | str]] = {
    "gradcam": _captum_gradcam, "saliency": _captum_saliency, "integrated_gradients": _captum_integrated_gradients,
    "smoothgrad": _captum_smoothgrad, "gradient_shap": _captum_gradient_shap, "deeplift": _captum_deeplift,
    "lime": _captum_lime, "occlusion": _captum_occlusion}


def _monai_cam(kind: str) -> Callable[[_Inputs], _Reference | str]:
    def build(r: _Inputs) -> _Reference | str:
        if kind == "GradCAMpp" and r.segmentation:
            return ("MONAI's GradCAMpp takes one score per image: on a segmentation output its score and gradient "
                    "shapes do not match")
        from monai import visualize

        # Postprocessing left out: MONAI's default normaliser rescales (and inverts) the map. MONAI's hooks stay
        # on the module for good, so it gets its own copy of the network. Its backward hook needs a gradient
        # upstream of the layer and the parameters are frozen, so the input requires one.
        cam = getattr(visualize, kind)(nn_module=copy.deepcopy(r.network), target_layers=r.layer_name,
                                       postprocessing=_unchanged)
        return _Reference(f"{kind}(nn_module=model, target_layers={r.layer_name!r}, postprocessing=identity)"
                          "(x.requires_grad_(), class_idx)",
                          lambda x, tile: cam(x=x.requires_grad_(True), class_idx=r.class_index))
    return build


def _monai_saliency(r: _Inputs) -> _Reference:
    from monai.visualize import VanillaGrad

    grad = VanillaGrad(copy.deepcopy(r.network))
    return _Reference("VanillaGrad(model)(x, index)", lambda x, tile: grad(x, index=r.class_index))


def _monai_smoothgrad(r: _Inputs) -> _Reference:
    from monai.visualize import SmoothGrad

    samples = r.values["samples"]
    smooth = SmoothGrad(copy.deepcopy(r.network), stdev_spread=r.values["noise"], n_samples=samples, verbose=False)
    return _Reference(f"SmoothGrad(model, stdev_spread, n_samples={samples}, verbose=False)(x, index)",
                      lambda x, tile: smooth(x, index=r.class_index))


def _monai_occlusion(r: _Inputs) -> _Reference:
    from monai.visualize import OcclusionSensitivity

    window, stride = r.values["window"], r.values["stride"]
    overlap = 1.0 - stride / window  # MONAI steps by mask_size * (1 - overlap): the same windows as ours
    occlusion = OcclusionSensitivity(nn_module=copy.deepcopy(r.network), mask_size=window, overlap=overlap,
                                     mode="mean_img", n_batch=_MONAI_OCCLUSION_BATCH, verbose=False)
    return _Reference(f"OcclusionSensitivity(nn_module=model, mask_size={window}, overlap={overlap:g}, "
                      f"mode='mean_img', n_batch={_MONAI_OCCLUSION_BATCH} (its default), verbose=False)(x)",
                      lambda x, tile: occlusion(x)[0], per_tile=False)


def _monai_confidence(r: _Inputs) -> _Reference:
    import torch
    from monai.inferers import sliding_window_inference

    def predict(x, tile):
        with torch.no_grad():
            return torch.softmax(sliding_window_inference(x, roi_size=r.patch, sw_batch_size=_MONAI_SW_BATCH,
                                                          predictor=r.network, overlap=r.overlap, mode="gaussian"),
                                 dim=1)

    return _Reference(f"sliding_window_inference(x, roi_size={r.patch}, sw_batch_size={_MONAI_SW_BATCH}, "
                      f"predictor=model, overlap={r.overlap}, mode='gaussian') + softmax, under torch.no_grad()",
                      predict, per_tile=False)


_MONAI: dict[str, Callable[[_Inputs], _Reference | str]] = {
    "gradcam": _monai_cam("GradCAM"), "gradcam_plus_plus": _monai_cam("GradCAMpp"), "saliency": _monai_saliency,
    "smoothgrad": _monai_smoothgrad, "occlusion": _monai_occlusion, "confidence": _monai_confidence}


def _reference(library: dict, missing: dict[str, str], name: str, label: str, method: str,
               inputs: _Inputs) -> _Reference | str:
    """The library's reference for ``method``, or why there is none."""
    if method not in library:
        return missing.get(method, f"{name} has no {label}")
    return library[method](inputs)


# ----------------------------------------------------------------------------------------------- children
def _engine_setup(case: Case) -> tuple[Explainer, Volume, Target, Box | None]:
    """The case's Explainer (created once per child), its volume, target and (classifier) target voxel box."""
    from .explain import Explainer
    from .geometry import Box, read_volume
    from .models import load_model
    from .targets import BoxRegion, Target

    model = load_model(case.card)
    explainer = Explainer(model, device=case.device, precision=case.precision)
    volume = read_volume(case.volume)
    voxel = case.target.get("voxel")
    if voxel is None:
        return explainer, volume, Target(case.target["class"]), None
    box = Box(voxel, [v + 1 for v in voxel])
    return explainer, volume, Target(case.target["class"], region=BoxRegion(box)), box


def _evict(explainer: Explainer) -> None:
    """Make the next run predict afresh: the Explainer keeps only the last volume it prepared."""
    import numpy as np

    from .geometry import Volume

    explainer.prepare(Volume(np.zeros((1, 1, 1), np.float32)))


def _memory_child(case: Case, variant: dict[str, Any]) -> dict[str, Any]:
    """One cold engine run in a fresh process: the parent reads the process's peak resident memory."""
    import resource

    import torch

    explainer, volume, target, _box = _engine_setup(case)
    before = _own_peak_mib() or _rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if explainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(explainer.device)
    counts: list[int] = []
    with _counting(explainer.model.module, counts):
        seconds, _result = _elapsed(lambda: explainer.explain(volume, case.method, target,
                                                              settings=variant["settings"]), explainer.device)
    cuda = (torch.cuda.max_memory_allocated(explainer.device) / 2**20 if explainer.device.type == "cuda" else None)
    return {"cold_s": seconds, "model_samples": sum(counts), "rss_before_run_mib": before, "cuda_peak_mib": cuda}


def _engine_measure(explainer: Explainer, volume: Volume, target: Target, case: Case, variant: dict[str, Any],
                    samples: list[int], maps: dict[str, Any], prime: Callable[[], None]) -> _Measure:
    """The engine's run of one variant; a prediction row evicts the cached prediction first, to time it."""
    from .methods import get_method

    row, device = variant["row"], explainer.device
    prediction = get_method(case.method).family == "prediction"

    def run() -> float:
        if prediction:
            _evict(explainer)
        counts: list[int] = []
        with _counting(explainer.model.module, counts):
            seconds, result = _elapsed(lambda: explainer.explain(volume, case.method, target,
                                                                 settings=variant["settings"]), device)
        samples.append(sum(counts))
        maps[row] = result.attribution.array
        return seconds

    heavy = device.type == "cpu" and variant["heavy"]
    return _Measure(f"engine:{row}", run, prime if heavy else run,
                    "the prediction pass only" if heavy else "one full run", 1 if heavy else case.repeats)


def _reference_measure(key: str, reference: _Reference, x, extent: Box, tiles: list[Box], case: Case,
                       device) -> _Measure:
    """A library's reference on the engine's normalised input ``x`` (1, C, K, J, I): on the extent at once, or tile
    by tile with the tiles' maps added into the extent."""
    import numpy as np

    from .runtime import autocast
    from .sliding import TileGrid, crop_padded

    def call(chosen: list) -> float:
        def job():
            if not reference.per_tile:
                with autocast(device, case.precision):
                    return reference.fn(crop_padded(x, extent).to(device), extent).detach().float().cpu()
            total = np.zeros((x.shape[1],) + extent.shape, np.float32)
            for tile in chosen:
                with autocast(device, case.precision):
                    attribution = reference.fn(crop_padded(x, tile).to(device), tile)
                TileGrid.accumulate(total, extent, tile, attribution.detach().float().cpu().numpy()[0])
            return total

        return _elapsed(job, device)[0]

    light = device.type == "cpu" and case.heavy_references
    if light and not reference.per_tile:
        warm, warm_up = None, "none (one long call; the limit's batch search warmed the network)"
    elif light:
        warm, warm_up = (lambda: call(tiles[:1])), "the first tile only"
    else:
        warm, warm_up = (lambda: call(tiles)), "one full run"
    return _Measure(key, lambda: call(tiles), warm, warm_up, 1 if light else case.repeats,
                    extra={"call": reference.call})


def _captum_forward(network, segmentation: bool):
    """The model as Captum's documentation calls it: the raw network, or for segmentation each class's logits
    summed over the voxels (its tutorial's wrapper), so that ``target=class_index`` explains the whole tile."""
    import torch

    if not segmentation:
        return network

    class ClassSums(torch.nn.Module):  # a module, not a function: DeepLift hooks the modules it is given
        def __init__(self):
            super().__init__()
            self.network = network

        def forward(self, x):
            return self.network(x).flatten(2).sum(2)

    return ClassSums()


def _timing_child(case: Case) -> dict[str, Any]:
    """Warm up, then time the engine's variants, the limit, Captum and MONAI, interleaved per repeat."""
    import numpy as np
    import torch

    from .geometry import Box
    from .methods import get_method
    from .sliding import TileGrid, crop_padded

    explainer, volume, target, box = _engine_setup(case)
    device, model, card = explainer.device, explainer.model, explainer.model.card
    spec = get_method(case.method)
    segmentation = card.task == "segmentation"
    prepared = explainer.prepare(volume)
    extent = Box.whole(volume.shape) if segmentation else explainer.patch_extent(box, volume.shape)
    tiles = TileGrid(volume.shape, card.patch_shape, explainer.overlap, extent).tiles
    class_index = card.class_index(case.target["class"])

    def prime() -> None:
        if segmentation:
            explainer.segmentation_probabilities(explainer.prepare(volume))
        else:
            explainer.class_probabilities(explainer.prepare(volume), extent)

    settings = {row: spec.validate(v["settings"]) for row, v in zip(case.rows, case.variants)}
    samples: dict[str, list[int]] = {row: [] for row in case.rows}
    maps: dict[str, Any] = {}
    measures = [_engine_measure(explainer, volume, target, case, variant, samples[variant["row"]], maps, prime)
                for variant in case.variants]

    values = settings[case.rows[0]]  # the variants differ in the engine's own settings only
    estimate = spec.samples(values, extent.shape) * len(tiles)
    limit = _Limit(model.module, crop_padded(prepared.x, tiles[0]).to(device), class_index, spec.needs_gradient,
                   estimate, case.batches, device, case.precision)
    limit_measure = _Measure("limit", limit.run, limit.search, "the batch-size search", case.repeats)
    measures.append(limit_measure)

    layer_name = model.default_layer() if spec.needs_layer else None
    inputs = _Inputs(network=model.module, forward=_captum_forward(model.module, segmentation),
                     layer=model.get_layer(layer_name) if layer_name else None, layer_name=layer_name,
                     class_index=class_index, values=values, x=crop_padded(prepared.x, extent), extent=extent,
                     patch=card.patch_shape, air=prepared.air, spacing=volume.spacing, overlap=explainer.overlap,
                     segmentation=segmentation, device=device)
    skipped = {}
    for key, library, missing, name in (("captum", _CAPTUM, _CAPTUM_MISSING, "Captum"),
                                        ("monai", _MONAI, {}, "MONAI")):
        reference = _reference(library, missing, name, spec.label, case.method, inputs)
        if isinstance(reference, str):
            skipped[key] = reference
        else:
            measures.append(_reference_measure(key, reference, prepared.x, extent, tiles, case, device))

    for measure in measures:
        if measure.warm is not None:
            measure.warm()
    for counts in samples.values():
        counts.clear()  # the warm-up's own runs are not reported
    for repeat in range(max(m.repeats for m in measures)):
        for measure in measures:
            if repeat < measure.repeats:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                measure.times.append(measure.run())
                if device.type == "cuda":
                    measure.cuda_peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    limit_measure.extra.update(limit.describe())

    checks = {}
    first = case.rows[0]
    for row in case.rows[1:]:
        span = float(maps[first].max() - maps[first].min())
        difference = float(np.abs(maps[row] - maps[first]).max())
        checks[row] = {"against": first, "max_abs_difference": difference, "range": span,
                       "max_abs_difference_over_range": difference / span if span > 0 else None}
    return {"settings": settings, "extent_shape_kji": list(extent.shape), "tiles": len(tiles),
            "class_index": class_index, "layer": layer_name, "samples_estimate": estimate,
            "model_samples": samples, "measures": {m.key: m.report() for m in measures}, "skipped": skipped,
            "map_checks": checks}


def _child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m CTXAILib.bench", description="one benchmark child (private)")
    parser.add_argument("--child", choices=("memory", "timing"), required=True)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--variant", type=int, default=0)
    args = parser.parse_args(argv)
    case = Case(**json.loads(args.spec.read_text()))
    try:
        result = (_memory_child(case, case.variants[args.variant]) if args.child == "memory"
                  else _timing_child(case))
    except CTXAIError as exc:
        args.result.write_text(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}))
        return 2
    result["own_peak_rss_mib"] = _own_peak_mib()
    args.result.write_text(json.dumps(result))
    return 0


def _run_child(kind: str, case: Case, workdir: Path, variant: int = 0) -> tuple[dict[str, Any], float]:
    """Run one child to its end; returns its result and its peak resident memory in MiB."""
    stem = workdir / f"{case.name}-{kind}-{variant}"
    spec, result, log = stem.with_suffix(".spec.json"), stem.with_suffix(".result.json"), stem.with_suffix(".log")
    spec.write_text(json.dumps(asdict(case)))
    env = dict(os.environ)
    # The child must run this very engine, whichever CTXAILib the interpreter would otherwise find.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "CTXAILib.bench", "--child", kind, "--spec", str(spec), "--result", str(result),
               "--variant", str(variant)]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env=env)
        try:
            _pid, status, usage = os.wait4(process.pid, 0)  # its rusage is the fallback where /proc is missing
        except BaseException:
            process.kill()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    data = json.loads(result.read_text()) if result.exists() else {}
    if "error" in data:
        kind_of_error = getattr(errors, data["error"]["type"], CTXAIError)
        raise kind_of_error(f"Benchmark case {case.name}: {data['error']['message']}")
    if process.returncode != 0 or not data:
        tail = "\n".join(log.read_text().strip().splitlines()[-15:])
        raise CTXAIError(f"The {kind} child of benchmark case {case.name} failed with exit status "
                         f"{process.returncode}:\n{tail}")
    return data, data.get("own_peak_rss_mib") or _rss_mib(usage.ru_maxrss)


# ---------------------------------------------------------------------------------------------- the run
def _machine(device, precision: str) -> dict[str, Any]:
    import psutil
    import torch

    from .record import library_versions

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(), "versions": library_versions(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "precision": precision, "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _pick_defect(phantom, patch: int) -> tuple[list[int], str, dict[str, Any]]:
    """The voxel and classifier class of the largest pore-class defect whose centred patch fits in the volume
    (another defect class only where the phantom has no pore)."""
    from .training import CLASSIFIER_CLASSES, TYPE_TO_CLASS

    size = phantom.ct.shape[::-1]

    def centre(defect) -> list[int]:
        return [int(round(c)) for c in defect.centre]

    def fits(defect) -> bool:
        return all(patch // 2 <= c <= n - patch // 2 for c, n in zip(centre(defect), size))

    if not phantom.defects:
        raise InputError(f"The benchmark phantom (seed {phantom.seed}) has no defect to explain.")
    chosen = max(phantom.defects, key=lambda d: (TYPE_TO_CLASS[d.type] == 1, fits(d), d.voxel_count))
    return centre(chosen), CLASSIFIER_CLASSES[TYPE_TO_CLASS[chosen.type]], chosen.to_dict()


def _median(measure: dict[str, Any] | None) -> float | None:
    return statistics.median(measure["times_s"]) if measure and measure.get("times_s") else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _against_key(case: str, against: str) -> str:
    """The ratio key of a variant against the case's first: ``engine_over_exhaustive`` for occlusion."""
    return f"engine_over_{against.removeprefix(case + '-')}"


def _row(case: Case, variant: dict[str, Any], memory: dict[str, Any], memory_rss: float, timing: dict[str, Any],
         timing_rss: float, models: dict[str, str]) -> dict[str, Any]:
    row = variant["row"]
    measures = timing["measures"]
    engine = measures[f"engine:{row}"]
    entry = {
        "name": row, "case": case.name, "model": models[case.model], "method": case.method,
        "settings": timing["settings"][row], "input_shape_kji": [case.shape] * 3,
        "extent_shape_kji": timing["extent_shape_kji"], "tiles": timing["tiles"], "target": case.target,
        "layer": timing["layer"],
        "engine": {"median_s": _median(engine), **engine, "model_samples_per_run": timing["model_samples"][row],
                   "model_samples_estimate": timing["samples_estimate"], "peak_rss_mib": memory_rss,
                   "rss_before_run_mib": memory["rss_before_run_mib"], "cold_run_s": memory["cold_s"],
                   "cold_run_model_samples": memory["model_samples"],
                   "cold_run_cuda_peak_mib": memory["cuda_peak_mib"]},
        "limit": {"median_s": _median(measures["limit"]), **measures["limit"]},
        "references_peak_rss_mib": timing_rss,
    }
    for key in ("captum", "monai"):
        entry[key] = ({"median_s": _median(measures[key]), **measures[key]} if key in measures
                      else {"skipped": timing["skipped"][key]})
    e = entry["engine"]["median_s"]
    entry["ratios"] = {f"engine_over_{key}": _ratio(e, entry[key].get("median_s"))
                       for key in ("limit", "captum", "monai")}
    check = timing["map_checks"].get(row)
    if check is not None:
        entry["map_check"] = check
        entry["ratios"][_against_key(case.name, check["against"])] = _ratio(
            e, _median(measures[f"engine:{check['against']}"]))
    return entry


def _criterion(text: str, value: float | None, relation: str, bound, missing: str, note: str | None) -> dict:
    if value is None:
        passed = None
    elif relation == "<=":
        passed = value <= bound
    elif relation == ">=":
        passed = value >= bound
    else:
        passed = bound[0] <= value <= bound[1]
    entry = {"criterion": text, "value": value, "relation": relation, "bound": bound, "pass": passed}
    if value is None:
        entry["note"] = missing
    elif note:
        entry["note"] = note
    return entry


def _criteria(rows: dict[str, dict], scaling: list[dict], quick: bool) -> list[dict[str, Any]]:
    note = "quick mode: reduced settings, not the issue's; no verdict on its targets" if quick else None

    def ratio(row: str, key: str) -> tuple[float | None, str]:
        return (rows[row]["ratios"].get(key) if row in rows else None), f"not measured: row {row} did not run"

    checks = [("Grad-CAM ≤ 1.3× limit", *ratio("classifier-gradcam", "engine_over_limit"), "<=", 1.3)]
    for method, label in (("integrated_gradients", "Integrated Gradients"), ("smoothgrad", "SmoothGrad"),
                          ("gradient_shap", "GradientSHAP")):
        row = f"classifier-{method}"
        checks.append((f"{label} ≤ 1.2× limit", *ratio(row, "engine_over_limit"), "<=", 1.2))
        checks.append((f"{label} ≤ 1.0× Captum", *ratio(row, "engine_over_captum"), "<=", 1.0))
    checks.append(("exhaustive occlusion ≤ 1.0× MONAI", *ratio("occlusion-exhaustive", "engine_over_monai"),
                   "<=", 1.0))
    speed, missing = ratio("occlusion-incremental", "engine_over_monai")
    checks.append(("incremental occlusion ≥ 5× faster than MONAI", None if speed is None else 1.0 / speed,
                   missing, ">=", 5.0))
    map_check = rows.get("occlusion-incremental", {}).get("map_check")
    checks.append(("incremental occlusion map = exhaustive (max abs difference / range ≤ 1e-4)",
                   map_check["max_abs_difference_over_range"] if map_check else None,
                   "not measured: needs both occlusion rows", "<=", 1e-4))
    for item in scaling:
        checks.append((f"U-Net {item['method']}: peak RSS 256³/128³ ≤ 1.25", item["peak_rss_ratio"], "", "<=",
                       1.25))
        checks.append((f"U-Net {item['method']}: time 256³/128³ within ±20 % of the voxel ratio (8)",
                       item["time_ratio"], "", "between", [6.4, 9.6]))
    if not scaling:
        checks.append(("U-Net peak RSS 256³/128³ ≤ 1.25", None, "not measured: needs U-Net rows at 128³ and 256³",
                       "<=", 1.25))
        checks.append(("U-Net time 256³/128³ within ±20 % of the voxel ratio (8)", None,
                       "not measured: needs U-Net rows at 128³ and 256³", "between", [6.4, 9.6]))
    return [_criterion(text, value, relation, bound, missing, note)
            for text, value, missing, relation, bound in checks]


def _scaling(rows: dict[str, dict]) -> list[dict[str, Any]]:
    small, large = _UNET_SHAPES
    out = []
    for name in UNET_METHODS_CUDA:
        a, b = rows.get(f"unet{small}-{name}"), rows.get(f"unet{large}-{name}")
        if a is None or b is None:
            continue
        time_ratio = _ratio(b["engine"]["median_s"], a["engine"]["median_s"])
        voxels = (large / small) ** 3
        tiles = b["tiles"] / a["tiles"]
        out.append({"method": name, "peak_rss_mib": [a["engine"]["peak_rss_mib"], b["engine"]["peak_rss_mib"]],
                    "peak_rss_ratio": _ratio(b["engine"]["peak_rss_mib"], a["engine"]["peak_rss_mib"]),
                    "time_s": [a["engine"]["median_s"], b["engine"]["median_s"]], "time_ratio": time_ratio,
                    "voxel_ratio": voxels, "time_ratio_over_voxel_ratio": _ratio(time_ratio, voxels),
                    "tile_ratio": tiles, "time_ratio_over_tile_ratio": _ratio(time_ratio, tiles)})
    return out


_NOTES = [
    "Times are medians over each measure's repeats; on a CPU the heavy measures (256³ U-Net, exhaustive occlusion "
    "and the occlusion references) run once, after a light warm-up (see each measure's warm_up). A heavy engine "
    "row's timed run is then the method's first run in its process and includes what the engine works out on "
    "first use (such as its batch-size probe).",
    "The engine's Explainer is created once per timing child and reused across repeats, as in an analyst's "
    "session. It keeps the last volume's normalised input and its prediction (a segmentation model's "
    "sliding-window probabilities; a classifier's class probabilities per extent), so after the warm-up the rows "
    "time the explanation alone; the confidence rows evict that cache before each run and time the prediction "
    "itself.",
    "Captum and MONAI get the engine's normalised input, the raw network (parameters frozen, as the engine loads "
    "it), and baselines and supervoxels computed outside their timers. On the U-Net they run tile by tile over the "
    "engine's tile grid (Captum on each tile's class logits summed over the voxels, its documented form for "
    "segmentation) and their tiles' maps are added into the volume.",
    "The limit is the registry's estimate of model evaluations × tiles × the raw network's best time per sample. "
    "model_samples_per_run counts the samples of the engine's calls of the whole network (prediction included); "
    "the incremental occlusion engine recomputes layers over the changed region without such calls.",
    "peak_rss_mib is the peak resident memory of a fresh process that ran the engine once (its baseline before "
    "the run is rss_before_run_mib); references_peak_rss_mib is the timing child's, references included.",
]


def run_bench(out: str | Path, device: str = "auto", precision: str = "fp32", repeats: int = 3,
              quick: bool = False, cases: Sequence[str] | None = None, log: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Run the benchmark, write its JSON report to ``out`` (atomically) and return the report."""
    if not hasattr(os, "wait4"):
        raise InputError("ctxai bench reads each case's peak memory with os.wait4, which this operating system "
                         "lacks; run it on Linux or macOS.")
    from .evaluation import bundled_model
    from .methods import get_method
    from .modelcard import ModelCard
    from .phantom import generate_phantom, save_phantom
    from .record import write_json
    from .runtime import autocast, resolve_device

    if repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {repeats}.")
    resolved = resolve_device(device)
    with autocast(resolved, precision):  # validates the precision name before any work
        pass
    planned, skipped = plan_cases(resolved.type, quick)
    planned = _select(planned, cases, skipped)
    skipped = [s for s in skipped if not cases or any(p in s["row"] for p in cases)]
    for case in planned:
        for variant in case.variants:
            get_method(case.method).validate(variant["settings"])  # a missing setting fails now, not after minutes
    started = time.perf_counter()
    machine = _machine(resolved, precision)
    workdir = Path(tempfile.mkdtemp(prefix="ctxai-bench-"))
    try:
        classifier = bundled_model("classifier")
        data = json.loads(classifier.read_text())
        # One tile of 48³: the same network (it pools globally) and weights, with a larger patch in its card.
        data.update(name=f"{data['name']}-48", patch_size=[_OCCLUSION_PATCH] * 3,
                    weights=str(ModelCard.load(classifier).weights_path))
        classifier48 = workdir / "classifier48.json"
        classifier48.write_text(json.dumps(data, indent=2))
        cards = {"classifier": classifier, "classifier48": classifier48, "unet": bundled_model("unet")}
        models = {"classifier": "classifier (32³ patch)", "classifier48": "classifier (its card with a 48³ patch)",
                  "unet": "U-Net (64³ tiles)"}
        phantoms, volumes, targets = [], {}, {}
        for shape in sorted({case.shape for case in planned}):
            log(f"generating the benchmark phantom (seed {BENCH_SEED}, {shape}³ voxels)")
            phantom = generate_phantom(BENCH_SEED, (shape,) * 3)
            volumes[shape] = str(save_phantom(phantom, workdir / f"phantom{shape}")["ct"])
            phantoms.append({"seed": BENCH_SEED, "shape_kji": [shape] * 3, "part": phantom.part_kind,
                             "defects": len(phantom.defects)})
            if any(case.shape == shape and case.model != "unet" for case in planned):
                voxel, name, defect = _pick_defect(phantom, _OCCLUSION_PATCH)
                targets[shape] = {"class": name, "voxel": voxel}
                phantoms[-1]["classifier_target"] = {"class": name, "voxel_ijk": voxel, "defect": defect}
        batches = list(_QUICK_BATCHES if quick else BATCHES)
        rows: dict[str, dict] = {}
        for number, case in enumerate(planned, start=1):
            case = replace(case, card=str(cards[case.model]), volume=volumes[case.shape], device=str(resolved),
                           precision=precision, repeats=1 if quick else repeats, batches=batches,
                           target=targets[case.shape] if case.model != "unet" else {"class": "void", "voxel": None})
            memory = {}
            for index, variant in enumerate(case.variants):
                log(f"[{number}/{len(planned)}] {variant['row']}: engine memory run")
                memory[variant["row"]] = _run_child("memory", case, workdir, index)
            log(f"[{number}/{len(planned)}] {case.name}: timing the engine, the limit, Captum and MONAI")
            timing, timing_rss = _run_child("timing", case, workdir)
            for variant in case.variants:
                result, rss = memory[variant["row"]]
                rows[variant["row"]] = _row(case, variant, result, rss, timing, timing_rss, models)
        scaling = _scaling(rows)
        report = {"benchmark": "ctxai bench", "machine": machine,
                  "options": {"repeats": repeats, "quick": quick, "cases": list(cases or []), "batches": batches},
                  "phantoms": phantoms, "notes": _NOTES, "rows": list(rows.values()), "skipped_rows": skipped,
                  "unet_scaling": scaling, "criteria": _criteria(rows, scaling, quick),
                  "minutes": (time.perf_counter() - started) / 60}
        write_json(report, out)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- output
_SYMBOLS = {"<=": "≤", ">=": "≥"}


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table: one row per case, then what was skipped and the criteria."""
    header = (f"{'case':<32s} {'engine s':>9s} {'limit s':>9s} {'×limit':>7s} {'Captum s':>9s} {'×Captum':>8s} "
              f"{'MONAI s':>9s} {'×MONAI':>7s} {'peak RSS MiB':>13s}")
    lines = [header, "-" * len(header)]
    notes = []
    for row in report["rows"]:
        ratios = row["ratios"]
        lines.append(f"{row['name']:<32s} {_cell(row['engine']['median_s']):>9s} {_cell(row['limit']['median_s']):>9s} "
                     f"{_cell(ratios['engine_over_limit'], 2):>7s} {_cell(row['captum'].get('median_s')):>9s} "
                     f"{_cell(ratios['engine_over_captum'], 2):>8s} {_cell(row['monai'].get('median_s')):>9s} "
                     f"{_cell(ratios['engine_over_monai'], 2):>7s} {_cell(row['engine']['peak_rss_mib'], 0):>13s}")
        for key, name in (("captum", "Captum"), ("monai", "MONAI")):
            if "skipped" in row[key]:
                notes.append(f"  {row['name']}: no {name} reference ({row[key]['skipped']})")
        if "map_check" in row:
            check = row["map_check"]
            notes.append(f"  {row['name']}: {_cell(ratios[_against_key(row['case'], check['against'])], 3)}× the "
                         f"time of {check['against']}; max map difference / range = "
                         f"{_cell(check['max_abs_difference_over_range'], 8)}")
    for item in report["skipped_rows"]:
        notes.append(f"  {item['row']}: not run ({item['reason']})")
    for item in report["unet_scaling"]:
        notes.append(f"  U-Net {item['method']} 256³/128³: time ×{_cell(item['time_ratio'], 2)} (voxels ×8, tiles "
                     f"×{_cell(item['tile_ratio'], 2)}), peak RSS ×{_cell(item['peak_rss_ratio'], 2)}")
    if notes:
        lines += ["", "notes:"] + notes
    lines += ["", "criteria (measured values, unadjusted):"]
    for item in report["criteria"]:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[item["pass"]]
        bound = (f"{item['bound'][0]:g}..{item['bound'][1]:g}" if item["relation"] == "between"
                 else f"{_SYMBOLS[item['relation']]} {item['bound']:g}")
        value = "not measured" if item["value"] is None else f"{item['value']:.4g}"
        lines.append(f"  {verdict}  {item['criterion']}: {value} (bound {bound})"
                     + (f" [{item['note']}]" if item.get("note") else ""))
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--repeats needs a whole number of at least 1, got {text!r}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the engine against the passes it needs, Captum and MONAI (JSON report)")
    p.add_argument("--out", type=Path, required=True, help="JSON report to write")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast on GPU")
    p.add_argument("--repeats", type=_positive, default=3,
                   help="timed runs per measure after the warm-up (heavy CPU measures run once)")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of about a minute")
    p.add_argument("--cases", type=lambda t: [part.strip() for part in t.split(",") if part.strip()],
                   metavar="SUBSTRING,...",
                   help="run only the cases whose name contains one of these (default: all)")
    p.set_defaults(run=_cmd_bench)


def _cmd_bench(args) -> int:
    report = run_bench(args.out, device=args.device, precision=args.precision, repeats=args.repeats,
                       quick=args.quick, cases=args.cases, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(report))
    print(f"\nreport: {args.out} ({report['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
