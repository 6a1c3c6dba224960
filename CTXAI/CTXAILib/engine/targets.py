"""Targets: what output of the model an attribution explains. One abstraction serves every method.

A target is a linear function of the model's (activated) output: a weight per class channel (+1 for the class,
-1 for a contrast class: "why pore, not crack") times a weight per output voxel (segmentation: the region, or a
single tile's share of it under sliding-window blending). Linearity is what lets a large volume be explained tile by
tile and summed exactly; see :mod:`.sliding`.

Regions (segmentation models; for classifiers the region only places the patch):

- :class:`WholeVolume`
- :class:`BoxRegion` -- an IJK box (a markups ROI converted by the scene bridge)
- :class:`MaskRegion` -- a boolean mask in the volume's grid
- :class:`VoxelRegion` -- one voxel
- :class:`ComponentRegion` -- the connected component of the predicted class that contains a clicked voxel
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import RegionError, TargetError
from .geometry import Box
from .modelcard import ModelCard

__all__ = ["Region", "WholeVolume", "BoxRegion", "MaskRegion", "VoxelRegion", "ComponentRegion", "FixedRegion", "Target",
           "ResolvedTarget", "SCORES", "parse_region"]

SCORES = ("logit", "probability")


class Region:
    """Where in the volume a segmentation target is summed."""

    needs_prediction = False

    def resolve(self, shape: tuple[int, int, int], predicted: np.ndarray | None = None) -> tuple[Box, np.ndarray | None]:
        """The region's bounding box and its mask inside that box (None: the whole box)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        """The region as JSON (the worker protocol's ``region`` object): a run record keeps it to re-run the run.
        A mask is named by its voxel count and digest; the mask file's path is the caller's to record."""
        raise NotImplementedError


@dataclass(frozen=True)
class WholeVolume(Region):
    def resolve(self, shape, predicted=None):
        return Box.whole(shape), None

    def describe(self) -> str:
        return "whole volume"

    def spec(self) -> dict:
        return {"type": "whole"}


@dataclass(frozen=True)
class BoxRegion(Region):
    box: Box

    def resolve(self, shape, predicted=None):
        self.box.check_inside(shape, "ROI")
        return self.box.clip(shape), None

    def describe(self) -> str:
        return f"IJK box {self.box.lo}-{self.box.hi}"

    def spec(self) -> dict:
        return {"type": "box", "lo": list(self.box.lo), "hi": list(self.box.hi)}


def _check_voxel(ijk: Sequence[int], shape: tuple[int, int, int], what: str) -> tuple[int, int, int]:
    ijk = tuple(int(round(v)) for v in ijk)
    limit = tuple(reversed(shape))
    if len(ijk) != 3 or not all(0 <= v < n for v, n in zip(ijk, limit)):
        raise RegionError(f"The {what} at voxel {ijk} (i,j,k) is outside the volume, whose voxels run from (0,0,0) "
                          f"to {tuple(n - 1 for n in limit)}. Click inside the volume.")
    return ijk


@dataclass(frozen=True)
class VoxelRegion(Region):
    ijk: tuple[int, int, int]

    def resolve(self, shape, predicted=None):
        i, j, k = _check_voxel(self.ijk, shape, "point")
        return Box((i, j, k), (i + 1, j + 1, k + 1)), None

    def describe(self) -> str:
        return f"voxel {tuple(self.ijk)}"

    def spec(self) -> dict:
        return {"type": "voxel", "ijk": [int(v) for v in self.ijk]}


@dataclass(frozen=True, eq=False)
class MaskRegion(Region):
    mask: np.ndarray

    def resolve(self, shape, predicted=None):
        mask = np.asarray(self.mask, dtype=bool)
        if mask.shape != tuple(shape):
            raise RegionError(f"The target mask has shape {mask.shape} but the volume is {tuple(shape)} (k,j,i). "
                              "Use a mask on the same grid as the volume (resample it in Slicer first).")
        if not mask.any():
            raise RegionError("The target mask is empty: no voxel is selected. Paint the region first.")
        nz = np.nonzero(mask)
        box = Box((nz[2].min(), nz[1].min(), nz[0].min()), (nz[2].max() + 1, nz[1].max() + 1, nz[0].max() + 1))
        return box, mask[box.slices]

    def describe(self) -> str:
        return f"mask of {int(np.count_nonzero(self.mask))} voxels"

    def spec(self) -> dict:
        mask = np.ascontiguousarray(self.mask, dtype=bool)
        return {"type": "mask", "voxels": int(np.count_nonzero(mask)),
                "sha256": hashlib.sha256(np.packbits(mask).tobytes() + str(mask.shape).encode()).hexdigest()}


@dataclass(frozen=True, eq=False)
class FixedRegion(Region):
    """A region already resolved on one volume: its box and, where it has one, its mask over the box (k, j, i).

    Checks re-explain a map on a changed model or input with it, so that the target stays the voxels the map was
    made for (a clicked component of a randomised model's prediction would be another region)."""

    box: Box
    mask: np.ndarray | None = None

    def resolve(self, shape, predicted=None):
        if self.box.clip(shape) != self.box:
            raise RegionError(f"The fixed region {self.box} does not lie inside the volume {tuple(shape)} (k,j,i).")
        return self.box, self.mask

    def describe(self) -> str:
        voxels = int(np.prod(self.box.shape)) if self.mask is None else int(np.count_nonzero(self.mask))
        return f"region of {voxels} voxels in box {list(self.box.lo)}-{list(self.box.hi)}"

    def spec(self) -> dict:
        return {"type": "fixed", "lo": list(self.box.lo), "hi": list(self.box.hi),
                "mask_voxels": None if self.mask is None else int(np.count_nonzero(self.mask))}


@dataclass(frozen=True)
class ComponentRegion(Region):
    ijk: tuple[int, int, int]
    needs_prediction = True

    def resolve(self, shape, predicted=None, class_name: str = "the target class"):
        from scipy import ndimage

        i, j, k = _check_voxel(self.ijk, shape, "clicked point")
        if predicted is None or not predicted[k, j, i]:
            raise RegionError(f"No predicted region of class {class_name} at voxel {(i, j, k)} (i,j,k): the model "
                              "does not label that voxel with it. Click inside a predicted region of that class "
                              "(the confidence method shows where it is predicted), explain that voxel alone "
                              "(--voxel), or use an ROI box instead.")
        # Only the component's bounding box matters: label the connected component around the click.
        labels, _ = ndimage.label(predicted, structure=np.ones((3, 3, 3), bool))
        component = labels == labels[k, j, i]
        return MaskRegion(component).resolve(shape)

    def describe(self) -> str:
        return f"predicted component at voxel {tuple(self.ijk)}"

    def spec(self) -> dict:
        return {"type": "component", "ijk": [int(v) for v in self.ijk]}


def parse_region(roi: Sequence[int] | None = None, point: Sequence[int] | None = None,
                 mask: np.ndarray | None = None, component: bool = True) -> Region:
    """Region from CLI-style arguments: ``roi`` (i0,j0,k0,i1,j1,k1), ``point`` (i,j,k) or ``mask``; at most one.

    A point selects the predicted component containing it when ``component`` is true, else that voxel only.
    """
    given = [name for name, value in (("roi", roi), ("point", point), ("mask", mask)) if value is not None]
    if len(given) > 1:
        raise RegionError(f"Give at most one of ROI box, point and mask; got {', '.join(given)}.")
    if roi is not None:
        return BoxRegion(Box.from_corners(roi))
    if point is not None:
        if len(point) != 3:
            raise RegionError(f"A point needs three voxel indices i,j,k; got {list(point)}.")
        return ComponentRegion(tuple(point)) if component else VoxelRegion(tuple(point))
    if mask is not None:
        return MaskRegion(mask)
    return WholeVolume()


@dataclass(frozen=True)
class Target:
    """What to explain: a class (name or index; None = the predicted class for classifiers, the first
    foreground class for segmentation), an optional contrast class, a region and the score kind.

    >>> Target("pore", contrast="crack").describe()
    "'pore' minus 'crack' (logit), whole volume"
    """

    class_name: str | int | None = None
    contrast: str | int | None = None
    region: Region = field(default_factory=WholeVolume)
    score: str = "logit"

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise TargetError(f"Target score must be one of {', '.join(SCORES)}, got {self.score!r}.")

    def describe(self) -> str:
        name = "predicted class" if self.class_name is None else repr(self.class_name)
        if self.contrast is not None:
            name = f"{name} minus {self.contrast!r}"
        return f"{name} ({self.score}), {self.region.describe()}"

    def resolve(self, card: ModelCard, shape: tuple[int, int, int],
                classify: Callable[[Box], int] | None = None,
                class_masks: Callable[[int], np.ndarray] | None = None) -> ResolvedTarget:
        """Fix class indices and the region for one volume.

        ``classify(box)`` (classifiers) gives the predicted class of the patch at the region's box when no class
        was named; ``class_masks(index)`` (segmentation) gives the predicted mask that a
        :class:`ComponentRegion` picks its component from.
        """
        region = self.region
        if card.task == "classification":
            if isinstance(region, MaskRegion):
                raise TargetError("A classifier explains one patch: give an ROI box or a point to place it, not a "
                                  "mask.")
            if isinstance(region, ComponentRegion):
                region = VoxelRegion(region.ijk)  # a click places the classifier's patch around it
        predicted = class_masks if region.needs_prediction else None
        contrast = None if self.contrast is None else card.class_index(self.contrast)
        if self.class_name is not None or card.task == "segmentation":
            index = card.class_index(self.class_name) if self.class_name is not None else \
                1 if len(card.class_names) > 1 else 0
            if predicted:
                box, mask = region.resolve(shape, predicted(index), class_name=repr(card.class_names[index]))
            else:
                box, mask = region.resolve(shape)
        else:
            box, mask = region.resolve(shape)
            index = int(classify(box)) if classify is not None else 0
        if contrast == index:
            raise TargetError(f"The contrast class {self.contrast!r} is the target class itself; a contrast needs "
                              "two different classes (for example pore minus crack).")
        return ResolvedTarget(index, contrast, self.score, box, mask, self)


@dataclass(frozen=True, eq=False)
class ResolvedTarget:
    """A target bound to a model and a volume: class indices and the region's box and mask in voxels."""

    class_index: int
    contrast_index: int | None
    score: str
    box: Box
    mask: np.ndarray | None
    target: Target

    def fixed(self) -> Target:
        """The same target on any model or input of this shape: class indices and region as resolved here."""
        return Target(self.class_index, self.contrast_index, FixedRegion(self.box, self.mask), self.score)

    def channel_weights(self, num_classes: int) -> torch.Tensor:
        weights = torch.zeros(num_classes)
        weights[self.class_index] = 1.0
        if self.contrast_index is not None:
            weights[self.contrast_index] = -1.0
        return weights

    def region_weights(self, tile: Box) -> np.ndarray | None:
        """The region's 0/1 weights over ``tile`` (k, j, i), or None where the tile misses the region."""
        overlap = tile.intersect(self.box)
        if overlap.empty:
            return None
        weights = np.zeros(tile.shape, np.float32)
        inside = overlap.offset([-v for v in tile.lo])
        if self.mask is None:
            weights[inside.slices] = 1.0
        else:
            weights[inside.slices] = self.mask[overlap.offset([-v for v in self.box.lo]).slices]
        return weights if weights.any() else None
