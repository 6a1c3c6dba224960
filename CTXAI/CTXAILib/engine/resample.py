"""Explicit resampling to a model's voxel spacing, and back to the input's exact geometry.

A card with ``"resample_to_spacing": true`` (nnU-Net's cards set it) asks for what the model's own inference does:
the volume is resampled to the card's spacing, explained there, and the maps come back on the input's grid with its
IJK-to-RAS matrix and shape bit-identical. Nothing happens silently: the explanation's warnings say from what to what,
and its ``resampling`` entry (in the run record) gives both grids and the interpolation.

The model grid follows nnU-Net's rule: along each axis ``n' = round(s / s' * n)`` voxels that cover exactly the
input's extent (voxel edges on voxel edges), so its spacing is ``n * s / n'`` (the card's ``s'`` to within half a
voxel over the extent) and its directions are the input's. Grey values and maps are interpolated linearly (nnU-Net
itself resamples images with cubic splines); masks, points and boxes given in the input's IJK move to the voxels of
the model grid whose centres they contain.

>>> import numpy as np
>>> from CTXAILib.engine.geometry import Volume
>>> grid = ModelGrid.between(Volume(np.zeros((10, 20, 20), np.float32), (0.5, 0.5, 1.0)), (1.0, 1.0, 1.0))
>>> grid.model_shape, grid.model_volume_spacing
((10, 10, 10), (1.0, 1.0, 1.0))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from ..errors import RegionError
from .geometry import Box, Volume
from .targets import (BoxRegion, ComponentRegion, FixedRegion, MaskRegion, Region, Target, VoxelRegion, WholeVolume,
                      _check_voxel)

__all__ = ["ModelGrid", "ResampledRegion"]


@dataclass(frozen=True, eq=False)
class ResampledRegion(FixedRegion):
    """A region resolved on the model grid, told in the input's IJK (``box``, ``mask``) for the checks that compare
    it with input-grid masks; a re-run on the same grids explains ``model`` exactly, not its round trip."""

    model: FixedRegion | None = None
    grids: tuple | None = None


@dataclass(frozen=True)
class ModelGrid:
    """The pair of grids: the input's (``shape``, ``spacing`` along i, j, k) and the model's, over the same extent."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    target_spacing: tuple[float, float, float]
    model_shape: tuple[int, int, int]

    @classmethod
    def between(cls, volume: Volume, target_spacing: Sequence[float]) -> ModelGrid:
        """The model grid of ``volume`` at ``target_spacing`` (mm along i, j, k)."""
        kji_target = np.asarray(target_spacing, float)[::-1]
        kji_spacing = np.asarray(volume.spacing, float)[::-1]
        # (s / t) * n, in the order nnU-Net computes it, so that a half voxel rounds as it does there.
        model_shape = tuple(max(1, int(np.round(s / t * n)))
                            for n, s, t in zip(volume.shape, kji_spacing, kji_target))
        return cls(volume.shape, volume.spacing, tuple(float(t) for t in target_spacing), model_shape)

    @property
    def needed(self) -> bool:
        """False when the model grid is the input's own (the input is at the card's spacing already)."""
        return self.model_shape != self.shape

    @property
    def scale(self) -> np.ndarray:
        """Input voxels per model voxel along (k, j, i)."""
        return np.asarray(self.shape, float) / np.asarray(self.model_shape, float)

    @property
    def model_volume_spacing(self) -> tuple[float, float, float]:
        """The model grid's spacing along (i, j, k), mm."""
        return tuple(float(s) * float(f) for s, f in zip(self.spacing, self.scale[::-1]))

    @property
    def key(self) -> tuple:
        return self.shape, self.spacing, self.model_shape

    def to_model(self, volume: Volume) -> Volume:
        """``volume`` (scalar or multi-channel) on the model grid, linearly interpolated, float32."""
        scale = self.scale
        # The model voxel m's centre lies at input index (m + 1/2) * scale - 1/2 along each axis.
        array = _affine(volume.array, scale, 0.5 * scale - 0.5, self.model_shape)
        origin = volume.ijk_to_ras @ np.array([*(0.5 * scale - 0.5)[::-1], 1.0])
        return Volume(array, self.model_volume_spacing, tuple(origin[:3]), volume.directions.copy())

    def to_input(self, array: np.ndarray, like: Volume) -> Volume:
        """A map (…, K', J', I') on the model grid, linearly interpolated onto ``like``'s grid (the input's), with
        ``like``'s geometry to the bit."""
        inverse = 1.0 / self.scale
        return like.with_array(_affine(np.asarray(array, np.float32), inverse, 0.5 * inverse - 0.5, self.shape))

    def describe(self) -> dict[str, Any]:
        """The run record's ``resampling`` entry."""
        return {"from_spacing_mm": list(self.spacing), "from_shape_ijk": list(self.shape[::-1]),
                "to_spacing_mm": [round(s, 6) for s in self.model_volume_spacing],
                "card_spacing_mm": list(self.target_spacing), "to_shape_ijk": list(self.model_shape[::-1]),
                "interpolation": "linear (input to model grid and maps back)",
                "regions": "input IJK boxes, points and masks moved to the model voxels whose centres they hold"}

    def message(self) -> str:
        shown = tuple(round(s, 4) for s in self.model_volume_spacing)
        return (f"Resampled the volume from {self.spacing} mm ({self.shape[::-1]} voxels i,j,k) to the model's "
                f"{shown} mm ({self.model_shape[::-1]} voxels) as its card asks (resample_to_spacing), explained "
                "there, and interpolated the maps back onto the input's exact grid (linear both ways).")

    # ----------------------------------------------------------------------------------------- regions
    def _model_index(self, ijk: Sequence[float]) -> tuple[int, int, int]:
        scale = self.scale[::-1]
        limit = np.asarray(self.model_shape[::-1]) - 1
        return tuple(int(v) for v in np.clip(np.floor((np.asarray(ijk, float) + 0.5) / scale), 0, limit))

    def _input_mask(self, mask_box: Box, mask: np.ndarray | None) -> tuple[Box, np.ndarray | None]:
        """A model-grid region (box and mask over it) in the input's IJK: each input voxel takes the value of the
        model voxel holding its centre."""
        full = np.zeros(self.model_shape, bool)
        full[mask_box.slices] = True if mask is None else mask
        indices = [np.minimum(((np.arange(n) + 0.5) / f).astype(int), m - 1)
                   for n, f, m in zip(self.shape, self.scale, self.model_shape)]
        back = full[np.ix_(*indices)]
        if not back.any():  # a region finer than the input's voxels: keep the voxel holding its centre
            centre = [int(min(n - 1, (lo + hi) / 2 * f)) for n, f, lo, hi in
                      zip(self.shape, self.scale, mask_box.lo[::-1], mask_box.hi[::-1])]
            back[tuple(centre)] = True
        nz = np.nonzero(back)
        box = Box((nz[2].min(), nz[1].min(), nz[0].min()), (nz[2].max() + 1, nz[1].max() + 1, nz[0].max() + 1))
        inner = back[box.slices]
        return box, None if inner.all() else inner

    def region(self, region: Region) -> Region:
        """``region`` (in the input's IJK) on the model grid."""
        if isinstance(region, WholeVolume):
            return region
        if isinstance(region, ResampledRegion) and region.grids == self.key and region.model is not None:
            return region.model
        if isinstance(region, (VoxelRegion, ComponentRegion)):
            _check_voxel(region.ijk, self.shape, "point")  # refused in the input's IJK, the ones the user gave
            return replace(region, ijk=self._model_index(region.ijk))
        if isinstance(region, BoxRegion):
            region.box.check_inside(self.shape)
            box = region.box.clip(self.shape)
            scale = self.scale[::-1]
            # Model voxel m's centre lies inside the box when lo <= (m + 1/2) * scale < hi.
            limit = np.asarray(self.model_shape[::-1])
            lo = np.minimum(np.ceil(np.asarray(box.lo) / scale - 0.5 - 1e-9).astype(int), limit - 1)
            hi = np.minimum(np.maximum(lo + 1, np.ceil(np.asarray(box.hi) / scale - 0.5 - 1e-9).astype(int)), limit)
            return BoxRegion(Box(tuple(int(v) for v in lo), tuple(int(v) for v in hi)))
        if isinstance(region, (MaskRegion, FixedRegion)):
            box, mask = region.resolve(self.shape)
            full = np.zeros(self.shape, bool)
            full[box.slices] = True if mask is None else mask
            # A model voxel belongs to the region when the input voxel holding its centre does.
            indices = [np.minimum(((np.arange(m) + 0.5) * f).astype(int), n - 1)
                       for n, f, m in zip(self.shape, self.scale, self.model_shape)]
            model = full[np.ix_(*indices)]
            if not model.any():  # a region smaller than one model voxel keeps the model voxel holding its centre
                centre = np.argwhere(full).mean(axis=0)
                model[tuple(int(min(m - 1, c / f)) for c, f, m in zip(centre, self.scale, self.model_shape))] = True
            return MaskRegion(model)
        raise RegionError(f"A {type(region).__name__} cannot be moved to the model's grid; give an ROI box, a point "
                          "or a mask.")

    def target(self, target: Target) -> Target:
        return replace(target, region=self.region(target.region))

    def fixed(self, target: Target) -> Target:
        """A model-grid fixed target (an explanation's) told in the input's IJK, keeping the exact model region."""
        region = target.region
        box, mask = self._input_mask(region.box, region.mask)
        return replace(target, region=ResampledRegion(box, mask, region, self.key))


def _affine(array: np.ndarray, scale: np.ndarray, offset: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``array`` (…, K, J, I) sampled linearly at input index ``m * scale + offset`` of each output voxel ``m``;
    edges repeat the outermost voxel (both grids cover the same extent, so only half a voxel lies beyond)."""
    from scipy import ndimage

    def one(channel: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(channel.astype(np.float32, copy=False), scale, offset, output_shape=shape,
                                        order=1, mode="nearest")

    if array.ndim == 3:
        return one(array)
    return np.stack([one(channel) for channel in array.reshape((-1,) + array.shape[-3:])]).reshape(
        array.shape[:-3] + shape)
