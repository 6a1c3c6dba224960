"""Reference inputs ("baselines") for path and perturbation methods, in the model's normalised units.

For CT the choice matters: zeros are not "no signal" after normalisation, so the analyst can pick

- ``zeros`` -- all zeros in normalised units;
- ``air`` -- the whole volume set to air (the card's ``air_value``, else the volume's minimum);
- ``part_mean`` -- every voxel of the part (Otsu threshold, holes filled so pores count as part) set to the
  part's mean grey value, air left as is: a defect-free, noise-free part;
- ``blurred`` -- the input blurred with a Gaussian of ``sigma_mm`` (voxel spacing respected): fine detail removed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import SettingError

__all__ = ["BASELINES", "make_baseline", "baseline_distribution"]

BASELINES = ("zeros", "air", "part_mean", "blurred")


def make_baseline(kind: str, x: torch.Tensor, air: float, spacing: tuple[float, float, float],
                  sigma_mm: float = 2.0) -> torch.Tensor:
    """Baseline of ``kind`` for a normalised input ``x`` (1, C, K, J, I); ``air`` in normalised units.

    >>> x = torch.zeros(1, 1, 4, 4, 4); x[..., 1:3, 1:3, 1:3] = 1.0
    >>> make_baseline("air", x, air=-1.0, spacing=(1.0, 1.0, 1.0)).unique().tolist()
    [-1.0]
    """
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "air":
        return torch.full_like(x, float(air))
    array = x.detach().cpu().numpy()
    if kind == "blurred":
        from scipy import ndimage

        sigma = [0, 0] + [sigma_mm / s for s in reversed(spacing)]
        return torch.from_numpy(ndimage.gaussian_filter(array, sigma, mode="nearest")).to(x)
    if kind == "part_mean":
        from scipy import ndimage
        from skimage.filters import threshold_otsu

        out = array.copy()
        for c in range(array.shape[1]):
            channel = array[0, c]
            if np.ptp(channel) == 0:
                continue
            part = ndimage.binary_fill_holes(channel > threshold_otsu(channel))
            if part.any():
                out[0, c][part] = channel[part].mean()
        return torch.from_numpy(out).to(x)
    raise SettingError(f"Unknown baseline {kind!r}; use one of {', '.join(BASELINES)}.")


def baseline_distribution(make: Callable[[str], torch.Tensor], count: int, generator: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    """``count`` baselines for SHAP-style expectations: air, part mean and blurred in turn, each with a little
    Gaussian noise (``noise`` times the baselines' range) so that the samples differ."""
    kinds = ("air", "part_mean", "blurred")
    base = [make(kind) for kind in kinds]
    spread = float(max(b.max() - b.min() for b in base)) or 1.0
    samples = []
    for index in range(count):
        b = base[index % len(kinds)]
        jitter = torch.randn(b.shape, generator=generator, dtype=b.dtype).to(b.device) * (noise * spread)
        samples.append(b + jitter)
    return torch.cat(samples)
