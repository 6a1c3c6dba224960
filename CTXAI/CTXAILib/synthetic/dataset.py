"""The data both bundled models are trained and evaluated on: their classes, the phantoms' shape and spacing,
the seeds that keep training and held-out evaluation apart, and the patches and per-voxel targets cut from a phantom.

Training (:mod:`.training`) and evaluation (:mod:`.evaluation`) both import this module and never each other's
constants, so that neither depends on the other for what the data is.
"""

from __future__ import annotations

import numpy as np

from ..engine.geometry import Box
from ..engine.modelcard import Normalization
from .phantom import CT_AIR, DEFECT_TYPES, Phantom

__all__ = ["CLASSIFIER_CLASSES", "SEGMENTATION_CLASSES", "TYPE_TO_CLASS", "TYPE_TO_SEGMENT", "NORMALIZATION",
           "TRAIN_SEED_BASE", "HELD_OUT_SEED_BASE", "PHANTOM_SHAPE", "SPACING_MM", "CLASSIFIER_PATCH", "UNET_CROP",
           "UNET_PATCH", "crop_around", "classifier_patches", "segmentation_targets"]

CLASSIFIER_CLASSES = ("normal", "pore", "crack", "inclusion")
TYPE_TO_CLASS = {"pore": 1, "lack_of_fusion": 1, "crack": 2, "inclusion_dense": 3, "inclusion_light": 3}
SEGMENTATION_CLASSES = ("background", "void", "inclusion")
TYPE_TO_SEGMENT = {"pore": 1, "lack_of_fusion": 1, "crack": 1, "inclusion_dense": 2, "inclusion_light": 2}
# Air to above the metal: tungsten saturates at 1, which is all a detector of inclusions needs.
NORMALIZATION = Normalization("window", window=(-1000.0, 4000.0))
TRAIN_SEED_BASE = 1000
HELD_OUT_SEED_BASE = 900_000
PHANTOM_SHAPE = (128, 128, 128)
SPACING_MM = (0.2, 0.2, 0.2)
CLASSIFIER_PATCH = 32
UNET_CROP = 48
UNET_PATCH = 64


def crop_around(array: np.ndarray, centre: tuple[int, int, int], size: int, fill: float) -> np.ndarray:
    """A size³ crop of a (k, j, i) array around ``centre`` (i, j, k), padded with ``fill`` outside."""
    lo = [int(c) - size // 2 for c in centre]
    box = Box(lo, [v + size for v in lo])
    inside = box.clip(array.shape)
    out = np.full((size,) * 3, fill, dtype=array.dtype)
    out[inside.offset([-v for v in box.lo]).slices] = array[inside.slices]
    return out


def classifier_patches(phantom: Phantom, rng: np.random.Generator, jitter: int = 4,
                       normal_per_defect: float = 1.0, size: int = CLASSIFIER_PATCH) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float16 patches (N, size, size, size) and class indices (N,) from one phantom.

    ``jitter=0`` centres defect patches exactly (evaluation); normal patches are centred on defect-free metal
    whose whole patch holds no defect voxel.
    """
    ct = NORMALIZATION.apply(phantom.ct.array)
    air = float(NORMALIZATION.apply(CT_AIR))
    patches, labels = [], []
    for defect in phantom.defects:
        centre = np.round(defect.centre).astype(int) + (rng.integers(-jitter, jitter + 1, 3) if jitter else 0)
        patches.append(crop_around(ct, tuple(centre), size, air))
        labels.append(TYPE_TO_CLASS[defect.type])
    from scipy import ndimage

    # Metal whose whole patch is defect-free: the defect mask dilated by half a patch, excluded.
    clear = phantom.part.array.astype(bool) & ~ndimage.binary_dilation(
        phantom.instances.array > 0, np.ones((3, 3, 3), bool), iterations=size // 2)
    candidates = np.argwhere(clear)
    wanted = int(round(normal_per_defect * max(len(phantom.defects), 1)))
    for index in rng.choice(len(candidates), size=min(wanted, len(candidates)), replace=False):
        k, j, i = candidates[index]
        patches.append(crop_around(ct, (i, j, k), size, air))
        labels.append(0)
    return np.stack(patches).astype(np.float16), np.array(labels, np.int64)


def segmentation_targets(phantom: Phantom) -> np.ndarray:
    """Per-voxel class indices (k, j, i) of :data:`SEGMENTATION_CLASSES` from the phantom's type labels."""
    lookup = np.zeros(len(DEFECT_TYPES) + 1, np.int64)
    for name, value in TYPE_TO_SEGMENT.items():
        lookup[DEFECT_TYPES.index(name) + 1] = value
    return lookup[phantom.labels.array]
