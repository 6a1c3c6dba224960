"""Localisation against a reference mask the analyst gives (ground truth, or a segmentation they trust).

Two scores, each printed beside the same score of the trivial controls (a map peaking at the centre of the
extent, the target region blurred, a random map), because on a patch centred on a defect a centre map points at the
defect too:

- the strict pointing game: the strongest |map| voxel lies in the mask grown by one voxel;
- the lift: the share of |map| mass inside the mask over the mask's share of the voxels (1 = no better than uniform).

The check passes when the map points inside the mask and its lift exceeds :data:`MIN_LIFT` and the lift of the
centre and random controls: those controls fail it by construction. The target-blur control shows what locality
alone gives (for a segmentation target drawn on the defect it is high, and a map need not beat it).
"""

from __future__ import annotations

import numpy as np

from .base import Check, CheckContext, CheckResult, control_maps, map_in, register_check

__all__ = ["MIN_LIFT", "pointing_and_lift", "localisation"]

MIN_LIFT = 2.0


def pointing_and_lift(attribution: np.ndarray, mask: np.ndarray) -> tuple[bool, float]:
    """Strict pointing hit (argmax of |map| inside ``mask`` grown by one voxel) and mass lift inside ``mask``."""
    from scipy import ndimage

    magnitude = np.abs(attribution).astype(np.float64)
    grown = ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool))
    hit = bool(grown.flat[int(np.argmax(magnitude))]) if magnitude.any() else False
    total = magnitude.sum()
    lift = float(magnitude[mask].sum() / total / mask.mean()) if total > 0 and mask.any() else 0.0
    return hit, lift


def localisation(ctx: CheckContext) -> CheckResult:
    e = ctx.explanation
    if ctx.reference_mask is None:
        return CheckResult("localisation", None, MIN_LIFT, None, "no reference mask was given")
    mask = np.asarray(ctx.reference_mask, bool)[e.extent.slices]
    if not mask.any():
        return CheckResult("localisation", None, MIN_LIFT, None,
                           "the reference mask has no voxel in the explained extent")
    hit, lift = pointing_and_lift(map_in(e), mask)
    scores = {name: pointing_and_lift(m, mask) for name, m in control_maps(e, ctx.seed).items()}
    controls = {f"{name}_lift": round(l, 4) for name, (_, l) in scores.items()}
    controls |= {f"{name}_points_inside": h for name, (h, _) in scores.items()}
    threshold = max(MIN_LIFT, scores["centre"][1], scores["random"][1])
    passed = hit and lift > threshold
    what = (f"the map's strongest voxel is {'inside' if hit else 'outside'} the reference mask; {lift:.1f}x more "
            f"of its mass there than uniform (centre control {scores['centre'][1]:.1f}x, target blur "
            f"{scores['target_blur'][1]:.1f}x, random {scores['random'][1]:.1f}x)")
    return CheckResult("localisation", round(lift, 4), round(threshold, 4), passed, what, controls,
                       {"points_inside": hit, "mask_voxels": int(mask.sum())})


register_check(Check("localisation", "Localisation on a reference mask",
                     "strict pointing game and mass lift inside the mask, beside the trivial controls",
                     localisation, runs=0.0, needs_reference=True, blocking=False))
