"""Target sensitivity: a map that looks the same for another target does not explain this one.

The method is run again for another target on the same input: for a classifier the runner-up class over the same
patch, for a segmentation target another predicted region of the same class (the largest one), or, where there is
none, the next class over the same region. The |maps| are rank-correlated where both targets' maps live (the union
of their informative regions); the check fails above :data:`THRESHOLD`. A map that does not depend on the target
(the centre and target-blur controls of a classifier) correlates at 1.0 and fails by construction.
"""

from __future__ import annotations

import numpy as np

from ..engine.geometry import Box
from ..engine.targets import FixedRegion, Target
from .base import (Check, CheckContext, CheckResult, control_maps, informative_region, map_in, rank_correlation,
                   register_check)

__all__ = ["THRESHOLD", "other_target", "target_sensitivity"]

THRESHOLD = 0.8


def _other_component(ctx: CheckContext) -> tuple[Target, Box] | None:
    """The largest predicted region of the target's class that is not the target (segmentation)."""
    from scipy import ndimage

    e = ctx.explanation
    index = e.fixed_target.class_name
    predicted = ctx.explainer.class_mask(ctx.volume, index)
    labels, count = ndimage.label(predicted, structure=np.ones((3, 3, 3), bool))
    box = Box(*e.target["box"])
    mine = set(np.unique(labels[box.slices][e.fixed_target.region.mask if e.fixed_target.region.mask is not None
                                            else slice(None)]).tolist()) - {0}
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    for label in np.argsort(-sizes):
        if label == 0 or label in mine or sizes[label] == 0:
            continue
        slices = ndimage.find_objects((labels == label).astype(np.int8))[0]
        other = Box((slices[2].start, slices[1].start, slices[0].start), (slices[2].stop, slices[1].stop,
                                                                         slices[0].stop))
        mask = labels[other.slices] == label
        return Target(index, None, FixedRegion(other, mask), e.fixed_target.score), other
    return None


def other_target(ctx: CheckContext) -> tuple[Target, Box, str]:
    """Another target to explain, the box its map is compared in, and its description."""
    e = ctx.explanation
    region = e.fixed_target.region
    card = ctx.explainer.model.card
    if e.prediction.get("task") == "segmentation":
        found = _other_component(ctx)
        if found is not None:
            target, box = found
            return target, box, f"another predicted {card.class_names[target.class_name]} region"
        others = [i for i in range(len(card.class_names)) if i not in (0, e.fixed_target.class_name)]
        index = others[0] if others else 0
        return (Target(index, None, region, e.fixed_target.score), Box(*e.target["box"]),
                f"class {card.class_names[index]} over the same region")
    return (Target(e.runner_up, None, region, e.fixed_target.score), Box(*e.target["box"]),
            f"the runner-up class {e.runner_up}")


def target_sensitivity(ctx: CheckContext) -> CheckResult:
    e = ctx.explanation
    target, other_box, described = other_target(ctx)
    # Compare over the bounding box of both targets' neighbourhoods, inside which each map's region lies.
    region_box = e.extent
    if other_box.intersect(e.extent) != other_box:
        region_box = Box(np.minimum(e.extent.lo, other_box.lo), np.maximum(e.extent.hi, other_box.hi))
    ctx.report(f"target sensitivity: explaining {described}")
    other = ctx.rerun(box=region_box, target=target)
    mine = map_in(e, region_box)
    region = np.zeros(region_box.shape, bool)
    near = informative_region(e)
    region[e.extent.offset([-v for v in region_box.lo]).slices] = near
    if e.prediction.get("task") == "segmentation":  # the other region's own neighbourhood counts too
        grown = other_box.grow([max(4, s // 2) for s in other_box.size]).intersect(region_box)
        region[grown.offset([-v for v in region_box.lo]).slices] = True
    value = round(rank_correlation(mine[region], other[region]), 4)
    controls = {name: round(rank_correlation(m[near], m[near]), 4)
                for name, m in control_maps(e, ctx.seed).items() if name != "random"}
    passed = value <= THRESHOLD
    what = (f"the map for {described} differs (rank correlation {value:.2f})" if passed else
            f"the map for {described} is nearly the same (rank correlation {value:.2f} > {THRESHOLD}): the map "
            "does not say why the model chose this target")
    return CheckResult("target_sensitivity", value, THRESHOLD, passed, what, controls,
                       {"other_target": described, "region_voxels": int(region.sum())})


register_check(Check("target_sensitivity", "Target sensitivity",
                     "rank correlation of |map| with the map for another class or region; must be low",
                     target_sensitivity, runs=1.0))
