"""Stability: a map that changes under noise the scanner itself makes, or with the sampling seed, cannot be read.

The input gets Gaussian noise of :data:`NOISE_FRACTION` of the model card's intensity window (or, without a window,
of the volume's 1st-99th percentile range), stated in the volume's grey units; sampling methods (LIME, KernelSHAP,
SmoothGrad, GradientSHAP, DeepSHAP) are also run with another seed. The value is the lowest rank correlation of |map|
with the original in the informative region; it passes at :data:`THRESHOLD` or above. A random map (the control)
correlates at about 0 with another draw and fails.
"""

from __future__ import annotations

import numpy as np

from ..engine.methods import get_method
from .base import (Check, CheckContext, CheckResult, control_maps, informative_region, map_in, rank_correlation,
                   register_check)

__all__ = ["THRESHOLD", "NOISE_FRACTION", "noise_sigma", "stability"]

THRESHOLD = 0.6
NOISE_FRACTION = 0.01
_SAMPLING = ("samples", "baselines", "noise")


def noise_sigma(ctx: CheckContext) -> float:
    """The noise's standard deviation in the volume's grey units."""
    norm = ctx.explainer.model.card.normalization
    window = getattr(norm, "window", None)
    if window:
        return NOISE_FRACTION * float(window[1] - window[0])
    lo, hi = np.percentile(ctx.volume.array, [1, 99])
    return NOISE_FRACTION * float(hi - lo or 1.0)


def stability(ctx: CheckContext) -> CheckResult:
    e = ctx.explanation
    region = informative_region(e)
    reference = map_in(e)[region]
    sigma = noise_sigma(ctx)
    rng = np.random.default_rng(ctx.seed + 1)
    noisy = ctx.volume.with_array(
        (ctx.volume.array + rng.normal(0.0, sigma, ctx.volume.array.shape)).astype(np.float32))
    ctx.report(f"stability: explaining with noise of {sigma:.3g} grey units")
    correlations = {"noise": round(rank_correlation(reference, ctx.rerun(volume=noisy)[region]), 4)}
    if any(s.name in _SAMPLING for s in get_method(e.method).settings):
        ctx.report("stability: explaining with another seed")
        correlations["seed"] = round(rank_correlation(reference, ctx.rerun(seed=ctx.seed + 1)[region]), 4)
    value = min(correlations.values())
    draws = control_maps(e, ctx.seed), control_maps(e, ctx.seed + 1)
    controls = {"random": round(rank_correlation(draws[0]["random"][region], draws[1]["random"][region]), 4)}
    passed = value >= THRESHOLD
    changes = " and ".join(f"{k} ({v:.2f})" for k, v in correlations.items())
    what = (f"the map holds under {changes}" if passed else
            f"the map changes under {changes}: rank correlation {value:.2f} < {THRESHOLD}; read only its "
            "broad location, or use more samples")
    return CheckResult("stability", value, THRESHOLD, passed, what, controls,
                       {"correlations": correlations, "noise_sigma_grey": round(sigma, 4)})


register_check(Check("stability", "Stability under noise and seed",
                     "rank correlation of |map| with the map of a slightly noisy input (1 % of the intensity window) "
                     "and, for sampling methods, another seed", stability, runs=1.5, blocking=False))
