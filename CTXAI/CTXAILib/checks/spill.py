"""Spill (segmentation): how much of the map sits on the explained region, and how much on other predicted
regions of the same class.

Grad-CAM on a U-Net averages gradients over the whole feature map, so the map of one clicked void lights up every
void: deletion curves cannot see that (removing any void lowers the summed score a little). Mass is |map| summed on
each predicted region grown by one voxel (partial volume), and on everything else (background). The value is the
explained region's share of the mass on predicted regions. It must reach halfway from what a constant map puts
there (the region's share of the regions' voxels) to all of it, and at least :data:`THRESHOLD`; and the region's
share of the whole map must be at least :data:`MIN_LIFT` times its share of the voxels. A constant map sits at the
lower end by construction and fails; the map of another region puts its mass there and fails.
"""

from __future__ import annotations

import numpy as np

from ..engine.geometry import Box
from .base import Check, CheckContext, CheckResult, control_maps, map_in, register_check

__all__ = ["THRESHOLD", "MIN_LIFT", "spill", "spill_shares"]

THRESHOLD = 0.5
MIN_LIFT = 2.0


def spill_shares(attribution: np.ndarray, target: np.ndarray, others: np.ndarray) -> dict[str, float]:
    """Shares of |map| mass (k, j, i arrays of one shape): on the target, on other regions, elsewhere; and the
    target's lift (its mass share over its voxel share)."""
    mass = np.abs(attribution).astype(np.float64)
    total = float(mass.sum())
    if total == 0.0:
        return {"target": 0.0, "other_regions": 0.0, "background": 0.0, "target_vs_regions": 0.0, "lift": 0.0}
    on_target = float(mass[target].sum())
    on_others = float(mass[others & ~target].sum())
    share = on_target / total
    return {"target": share, "other_regions": on_others / total, "background": 1.0 - share - on_others / total,
            "target_vs_regions": on_target / max(on_target + on_others, 1e-300),
            "lift": share / max(float(target.mean()), 1e-12)}


def spill(ctx: CheckContext) -> CheckResult:
    from scipy import ndimage

    e = ctx.explanation
    if e.prediction.get("task") != "segmentation":
        return CheckResult("spill", None, THRESHOLD, None, "spill applies to segmentation targets only")
    predicted = ctx.explainer.class_mask(ctx.volume, e.fixed_target.class_name)
    grow = np.ones((3, 3, 3), bool)
    extent = e.extent
    others = ndimage.binary_dilation(predicted[extent.slices], grow)
    target = np.zeros(extent.shape, bool)
    box = Box(*e.target["box"]).offset([-v for v in extent.lo])
    mask = e.fixed_target.region.mask
    target[box.slices] = True if mask is None else mask
    target = ndimage.binary_dilation(target, grow)
    shares = spill_shares(map_in(e), target, others)
    controls = {name: round(spill_shares(m, target, others)["target_vs_regions"], 4)
                for name, m in control_maps(e, ctx.seed).items()}
    controls["constant"] = round(spill_shares(np.ones(extent.shape), target, others)["target_vs_regions"], 4)
    threshold = round(max(THRESHOLD, (1.0 + controls["constant"]) / 2.0), 4)
    value = round(shares["target_vs_regions"], 4)
    passed = value >= threshold and shares["lift"] >= MIN_LIFT
    what = (f"{shares['target']:.0%} of the map is on the explained region, {shares['other_regions']:.0%} on other "
            f"predicted regions of its class")
    if not passed:
        what += (f": the map spills onto other regions (needs >= {threshold:.0%} of the regions' mass and a lift "
                 f">= {MIN_LIFT:g}, has {value:.0%} and {shares['lift']:.1f})")
    return CheckResult("spill", value, threshold, passed, what, controls,
                       {k: round(v, 4) for k, v in shares.items()} | {"min_lift": MIN_LIFT})


register_check(Check("spill", "Spill onto other regions",
                     "share of |map| on the explained region against other predicted regions of the class",
                     spill, runs=0.0, segmentation_only=True, blocking=False))
