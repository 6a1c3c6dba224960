"""Pictures of an explanation for records and reports: a tri-planar PNG of CT, heat map and ground-truth outline.

Only matplotlib (headless ``Agg``) and numpy: a report can be made on a machine without Slicer or a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..engine.geometry import Volume, atomic_output
from ..engine.signs import SIGNS

__all__ = ["triplanar_png", "triplanar_picture"]


def _planes(array: np.ndarray, ijk: Sequence[int]) -> list[np.ndarray]:
    i, j, k = ijk
    # Axial (k fixed), coronal (j fixed), sagittal (i fixed); rows run along the slower axis.
    return [array[k], array[:, j, :], array[:, :, i]]


def _window(shape: tuple[int, int], centre: tuple[int, int], size: int) -> tuple[slice, slice]:
    out = []
    for n, c in zip(shape, centre):
        lo = int(np.clip(c - size // 2, 0, max(n - size, 0)))
        out.append(slice(lo, min(lo + size, n)))
    return tuple(out)


def _heat_rgba(values: np.ndarray, signed: bool, top: float) -> np.ndarray:
    """Colours with opacity rising with |value|: weak attribution leaves the CT visible."""
    from matplotlib import colormaps

    if signed:
        scaled = np.clip(values / top, -1.0, 1.0)
        rgba = colormaps["RdBu_r"]((scaled + 1.0) / 2.0)
        alpha = np.abs(scaled)
    else:
        scaled = np.clip(values / top, 0.0, 1.0)
        rgba = colormaps["hot"](0.25 + 0.75 * scaled)
        alpha = scaled
    rgba[..., 3] = np.clip((alpha - 0.15) / 0.6, 0.0, 0.85)
    return rgba


def triplanar_png(ct: Volume, attribution: Volume, path: str | Path, centre_ijk: Sequence[int], *,
                  sign: str, title: str, outline: np.ndarray | None = None, window: tuple[float, float] = (-1000.0,
                  4000.0), field_voxels: int = 64) -> Path:
    """Axial, coronal and sagittal views through ``centre_ijk``: CT in grey, the attribution on top in the colours
    of its method's ``sign`` (a key of :data:`~CTXAILib.engine.signs.SIGNS`), and ``outline`` (a boolean
    ground-truth mask) as a green contour."""
    png, _ = triplanar_picture(ct, attribution, centre_ijk, sign=sign, title=title, outline=outline, window=window,
                               field_voxels=field_voxels)
    with atomic_output(path) as tmp:
        tmp.write_bytes(png)
    return Path(path)


def triplanar_picture(ct: Volume, attribution: Volume, centre_ijk: Sequence[int], *, sign: str, title: str,
                      outline: np.ndarray | None = None, window: tuple[float, float] = (-1000.0, 4000.0),
                      field_voxels: int = 64) -> tuple[bytes, dict]:
    """The picture of :func:`triplanar_png` as PNG bytes, and its layout: the PNG's ``size`` [width, height] in
    pixels and per panel (axial, coronal, sagittal) its ``bbox_px`` [x0, y0, x1, y1] (from the top-left corner) and
    the voxel ``rows`` and ``columns`` [first, end) it shows: where a voxel lands in the picture."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meaning = SIGNS[sign]
    magnitude = np.abs(attribution.array[attribution.array != 0])
    top = float(np.percentile(magnitude, 99.5)) if magnitude.size else 1.0
    top = top if top > 0 else 1.0
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    names = ("axial (k)", "coronal (j)", "sagittal (i)")
    centre = [int(v) for v in centre_ijk]
    spacing = ct.spacing
    aspects = (spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1])
    centres_2d = ((centre[1], centre[0]), (centre[2], centre[0]), (centre[2], centre[1]))
    masks = _planes(outline, centre) if outline is not None else [None] * 3
    views = []
    for axis, image, heat, mask, name, aspect, c2 in zip(axes, _planes(ct.array, centre),
                                                         _planes(attribution.array, centre), masks, names, aspects,
                                                         centres_2d):
        view = _window(image.shape, c2, field_voxels)
        views.append(view)
        axis.imshow(image[view], cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        axis.imshow(_heat_rgba(heat[view], meaning.signed, top), aspect=aspect, interpolation="nearest")
        if mask is not None and mask[view].any():
            axis.contour(mask[view].astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        axis.axhline(c2[0] - view[0].start, color="white", lw=0.4, alpha=0.5)
        axis.axvline(c2[1] - view[1].start, color="white", lw=0.4, alpha=0.5)
        axis.set_title(name)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.text(0.5, 0.02, f"grey: CT; colour: {meaning.legend}; green: ground-truth defect outline", ha="center",
                fontsize=8)
    figure.tight_layout(rect=(0, 0.05, 1, 0.95))
    buffer = io.BytesIO()
    dpi = 90
    figure.savefig(buffer, dpi=dpi, format="png")
    width, height = (int(round(v * dpi)) for v in figure.get_size_inches())
    panels = []
    for axis, name, view in zip(axes, ("axial", "coronal", "sagittal"), views):
        x0, y0, x1, y1 = (float(v) * dpi for v in axis.get_position().extents * np.tile(figure.get_size_inches(), 2))
        panels.append({"plane": name, "bbox_px": [x0, height - y1, x1, height - y0],
                       "rows": [view[0].start, view[0].stop], "columns": [view[1].start, view[1].stop]})
    plt.close(figure)
    return buffer.getvalue(), {"size": [width, height], "panels": panels}
