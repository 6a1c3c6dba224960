"""Perturbation methods through Captum: occlusion with a 3-D window, and LIME, KernelSHAP and feature ablation
over spacing-aware supervoxels. Plus the segmentation model's own probability map ("confidence"), which is a
prediction, not an attribution, and is registered here so that the panel can offer it beside them.

These kernels perturb the whole extent and query the tiled model (``ctx.forward``), so they see exactly what the
sliding-window model sees; each batch of perturbed copies is one call, sized to the memory budget.
"""

from __future__ import annotations

import numpy as np
import torch
from captum._utils.models.linear_model import SkLearnLasso
from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion

from ...errors import SettingError
from ..baselines import BASELINES
from ..incremental import Unsupported, occlusion_map, window_boxes
from ..supervoxels import supervoxels
from .registry import MethodSpec, Setting, VolumeContext, register

__all__: list[str] = []

# Filling metal with air would draw an artificial pore; the part's mean grey value removes a defect instead.
_FILL = Setting("fill", "choice", "part_mean", "What replaces a removed region: the part's mean grey value, air, "
                "the blurred input, or zeros.", choices=BASELINES)
_SIGMA = Setting("blur_sigma_mm", "float", 2.0, "Gaussian width of the blurred fill, in mm.", minimum=0.01,
                 maximum=100.0)
_SEGMENTS = Setting("supervoxels", "int", 150, "Approximate number of supervoxels (SLIC, compact in mm).",
                    minimum=2, maximum=5000)
_COMPACTNESS = Setting("compactness", "float", 0.1, "SLIC compactness: higher gives rounder, less grey-value "
                       "driven supervoxels.", minimum=1e-4, maximum=100.0)


def _fill(ctx: VolumeContext, settings: dict) -> torch.Tensor:
    return ctx.baseline(settings["fill"], settings["blur_sigma_mm"])


def _feature_mask(ctx: VolumeContext, settings: dict) -> torch.Tensor:
    labels = supervoxels(ctx.x[0].cpu().numpy(), ctx.spacing, settings["supervoxels"], settings["compactness"])
    if labels.max() < 1:
        raise SettingError(f"SLIC made a single supervoxel of this {tuple(ctx.x.shape[2:])} extent, so there is "
                           "nothing to compare. Raise 'supervoxels' or lower 'compactness'.")
    return torch.from_numpy(labels)[None, None]


# More voxels than this at the maximum and "the strongest voxel" (a pointing game, a top-1 % overlay) is a tie.
_LARGE_TIE = 8


def _note_ties(ctx: VolumeContext, attribution: torch.Tensor, label: str) -> torch.Tensor:
    """Tell the user when many voxels share the map's maximum |value|: a supervoxel method gives a whole supervoxel
    one value, and a sparse or noisy fit leaves few distinct values."""
    magnitude = attribution.abs()
    at_top = int((magnitude == magnitude.max()).sum())
    if at_top > _LARGE_TIE:
        ctx.notes.append(f"{label}: {at_top} voxels share the map's maximum |value| and the map has "
                         f"{int(torch.unique(attribution).numel())} distinct values (one per supervoxel at most), so "
                         "its strongest voxel is not a point: read it by supervoxel, not voxel by voxel.")
    return attribution


def occlusion(ctx: VolumeContext, settings: dict) -> torch.Tensor:
    if settings["stride"] > settings["window"]:
        raise SettingError(f"Occlusion stride {settings['stride']} is larger than its window {settings['window']}, "
                           "so some voxels would never be occluded. Use a stride of at most the window.")
    fill = _fill(ctx, settings)
    if settings["engine"] == "incremental":
        try:
            attribution, notes = occlusion_map(ctx.x, fill, ctx.tiles, settings["window"], settings["stride"],
                                               ctx.batch_size, ctx.tick)
            ctx.notes.extend(notes)
            return attribution
        except Unsupported as exc:
            ctx.notes.append(f"Incremental occlusion cannot follow this model: {exc}. Every window was computed "
                             "with a full forward pass instead (the same map, slower).")
    channels = ctx.x.shape[1]
    window = tuple(min(settings["window"], n) for n in ctx.x.shape[2:])
    return Occlusion(ctx.forward).attribute(
        ctx.x, sliding_window_shapes=(channels,) + window, strides=(channels,) + (settings["stride"],) * 3,
        baselines=fill, perturbations_per_eval=ctx.batch_size)[0]


def _lime_similarity(kernel_width: float):
    """LIME's kernel on the interpretable vector z (Ribeiro et al. 2016): cosine distance between z and all-ones."""
    def similarity(_original, _perturbed, interpretable, **_kwargs):
        z = interpretable.float()
        kept = z.sum()
        distance = 1.0 - torch.sqrt(kept / z.numel()) if kept > 0 else torch.tensor(1.0)
        return torch.exp(-(distance ** 2) / kernel_width ** 2)
    return similarity


def lime(ctx: VolumeContext, settings: dict) -> torch.Tensor:
    fill = _fill(ctx, settings)
    # Lasso's alpha acts in the units of the score; dividing by the whole effect f(x) - f(fill) makes
    # lasso_alpha a fraction of it, the same for a logit of 20 and a probability of 0.01.
    ends = ctx.forward(torch.cat([ctx.x, fill]))
    scale = float((ends[0] - ends[1]).abs().clamp_min(1e-12))
    with torch.random.fork_rng():
        torch.manual_seed(ctx.seed)
        surrogate = SkLearnLasso(alpha=settings["lasso_alpha"])
        weights = Lime(lambda batch: ctx.forward(batch) / scale, interpretable_model=surrogate,
                       similarity_func=_lime_similarity(settings["kernel_width"])).attribute(
            ctx.x, baselines=fill, feature_mask=_feature_mask(ctx, settings), n_samples=settings["samples"],
            perturbations_per_eval=ctx.batch_size)[0]
    return _note_ties(ctx, weights * scale, "LIME")


def kernel_shap(ctx: VolumeContext, settings: dict) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(ctx.seed)
        values = KernelShap(ctx.forward).attribute(
            ctx.x, baselines=_fill(ctx, settings), feature_mask=_feature_mask(ctx, settings),
            n_samples=settings["samples"], perturbations_per_eval=ctx.batch_size)[0]
    return _note_ties(ctx, values, "KernelSHAP")


def feature_ablation(ctx: VolumeContext, settings: dict) -> torch.Tensor:
    return FeatureAblation(ctx.forward).attribute(
        ctx.x, baselines=_fill(ctx, settings), feature_mask=_feature_mask(ctx, settings),
        perturbations_per_eval=ctx.batch_size)[0]


def confidence(ctx: VolumeContext, settings: dict) -> torch.Tensor:
    probabilities = ctx.probabilities()
    target = ctx.target
    value = probabilities[target.class_index]
    if target.contrast_index is not None:
        value = value - probabilities[target.contrast_index]
    return torch.from_numpy(np.ascontiguousarray(value))[None]


register(MethodSpec(
    "occlusion", "Occlusion", "perturbation",
    "Drop in the target when a 3-D window is filled, slid over the volume (Zeiler and Fergus 2014).",
    sign="attribution", aggregation="volume", kernel=occlusion, needs_gradient=False,
    samples=lambda s, shape: float(len(window_boxes(shape, s["window"], s["stride"])[0]) + 1),
    settings=(Setting("window", "int", 8, "Edge of the cubic occlusion window, in voxels.", minimum=1, maximum=256),
              Setting("stride", "int", 4, "Step between window positions, in voxels (at most the window).",
                      minimum=1, maximum=256),
              _FILL, _SIGMA,
              Setting("engine", "choice", "incremental", "incremental: each occluded pass recomputes only the "
                      "window's receptive field, layer by layer (exact); exhaustive: a full forward pass per "
                      "window, as Captum and MONAI do.", choices=("incremental", "exhaustive")))))
register(MethodSpec(
    "lime", "LIME (supervoxels)", "perturbation",
    "A sparse linear surrogate fitted to the model on random subsets of supervoxels (Ribeiro et al. 2016).",
    sign="attribution", aggregation="volume", kernel=lime, needs_gradient=False,
    samples=lambda s, shape: float(s["samples"] + 2),
    # Utilities/perturbation_stability.py measured the figures in this help and in KernelSHAP's (issue 10).
    settings=(Setting("samples", "int", 500, "Perturbed copies evaluated. Stability measured on the bundled "
                      "classifier (held-out pore patches, rank correlation of |map|): between two seeds 0.32 at 200 "
                      "samples, 0.40 at 500; under noise of 1 % of the window 0.17 and 0.32. No affordable count "
                      "makes the map stable: read it by supervoxel.", minimum=10, maximum=20000),
              _SEGMENTS, _COMPACTNESS,
              Setting("kernel_width", "float", 0.25, "Width of LIME's exponential kernel on the cosine distance.",
                      minimum=0.01, maximum=10.0),
              Setting("lasso_alpha", "float", 0.001, "L1 strength of the Lasso surrogate.", minimum=0.0,
                      maximum=10.0),
              _FILL, _SIGMA)))
register(MethodSpec(
    "kernel_shap", "KernelSHAP (supervoxels)", "perturbation",
    "Shapley values of supervoxels estimated by weighted linear regression (Lundberg and Lee 2017).",
    sign="attribution", aggregation="volume", kernel=kernel_shap, needs_gradient=False,
    samples=lambda s, shape: float(s["samples"]),
    settings=(Setting("samples", "int", 1000, "Coalitions evaluated. Stability measured on the bundled classifier "
                      "(held-out pore patches, rank correlation of |map|): between two seeds 0.03 at 200 "
                      "coalitions, 0.13 at 1000; under noise of 1 % of the window 0.06 and 0.12. No affordable "
                      "count makes the map stable: read it by supervoxel.", minimum=10, maximum=20000),
              _SEGMENTS, _COMPACTNESS, _FILL, _SIGMA)))
register(MethodSpec(
    "feature_ablation", "Feature ablation (supervoxels)", "perturbation",
    "Drop in the target when each supervoxel alone is filled.",
    sign="attribution", aggregation="volume", kernel=feature_ablation, needs_gradient=False,
    samples=lambda s, shape: float(s["supervoxels"] + 1),
    settings=(_SEGMENTS, _COMPACTNESS, _FILL, _SIGMA)))
register(MethodSpec(
    "confidence", "Confidence (model probability)", "prediction",
    "The segmentation model's own probability of the target class per voxel: what it predicts, not why.",
    sign="magnitude", aggregation="volume", kernel=confidence, needs_gradient=False, segmentation_only=True,
    samples=lambda s, shape: 1.0))
