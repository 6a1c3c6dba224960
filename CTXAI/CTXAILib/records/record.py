"""Run records: what an analyst needs to reproduce and defend an explanation (seed 002, accountability).

A record names the input (hash, shape, geometry), the model (name, sha256, card), the method with every setting,
the target, the library versions, the device and the timings, and lists the output files.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from ..engine.explain import Explanation
from ..engine.geometry import Volume, atomic_output
from ..engine.models import LoadedModel

__all__ = ["run_record", "library_versions", "write_json"]

_LIBRARIES = ("ctxai", "torch", "captum", "numpy", "scipy", "SimpleITK", "scikit-image", "scikit-learn", "monai")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def run_record(result: Explanation, volume: Volume, model: LoadedModel,
               outputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON-ready record of one run."""
    import torch

    device = result.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": {"sha256": result.input_sha256, "shape_kji": list(volume.shape), "channels": volume.channels,
                  "dtype": str(volume.array.dtype), "spacing_mm": list(volume.spacing),
                  "ijk_to_ras": volume.ijk_to_ras.tolist()},
        "model": {"name": model.card.name, "sha256": model.sha256, "card": model.card.to_dict(),
                  "torchscript": model.is_torchscript},
        "method": {"name": result.method, "family": result.family, "sign": result.sign, "signed": result.signed,
                   "settings": result.settings, "layer": result.layer},
        "target": result.target,
        "prediction": result.prediction,
        "quality": result.quality,
        "extent_ijk": {"lo": list(result.extent.lo), "hi": list(result.extent.hi)},
        "sliding_window": result.tiling,
        "device": device,
        "precision": result.precision,
        "versions": library_versions(),
        "timings_s": {k.removesuffix("_s"): round(v, 4) for k, v in result.timings.items()},
        "warnings": result.warnings,
        "outputs": outputs or {},
    }


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return Path(path)
