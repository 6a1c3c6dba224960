"""Reproduce a recorded run from its ``run.json`` and compare the new outputs with the recorded ones.

Before recomputing, the files the run read are hashed again and the record's versions and settings are compared
with this machine's: a changed input or model is named and not re-run (the result could not be the same run), a
changed library version or method default is named and the run re-made anyway. On CPU the maps must be bit for bit
identical; on a GPU, whose kernels are not deterministic, within ``tolerance`` times the recorded map's largest
magnitude.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.files import regular_file, sha256_path
from ..errors import InputError, MethodError

__all__ = ["Reproduction", "GPU_TOLERANCE", "differences", "reproduce"]

GPU_TOLERANCE = 1e-3  # of the map's largest |value|: cuDNN's atomics reorder float sums between runs


@dataclass
class Reproduction:
    """What :func:`reproduce` found: the differences named before recomputing (``input``, ``model``,
    ``versions``, ``settings``: one line each), whether it re-ran, and per output its largest absolute difference.
    ``identical`` holds when nothing blocking differs and every output is within ``tolerance``."""

    run_dir: Path
    differences: dict[str, list[str]] = field(default_factory=dict)
    rerun: bool = False
    device: str = "cpu"
    tolerance: float = 0.0
    outputs: dict[str, float] = field(default_factory=dict)   # name -> max |new - recorded| (inf: shape differs)
    mismatches: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.rerun and not self.mismatches


def _load_record(run_dir: Path) -> dict[str, Any]:
    path = regular_file(run_dir / "run.json", "Run record", InputError)
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"Run record {path} is not valid JSON ({exc}). Restore it from the run's archive.") from None
    missing = [key for key in ("sources", "seed", "window", "method", "target", "input", "model")
               if key not in record]
    if missing or "volume" not in record.get("sources", {}) or "region_spec" not in record.get("target", {}):
        raise InputError(f"Run record {path} lacks {', '.join(missing) or 'the volume file or the target region'}:"
                         " it was written by an older CTXAI or by the worker (no input file). Re-run it with "
                         "`ctxai explain` to get a reproducible record.")
    return record


def _file_changed(record: dict, name: str, what: str) -> str | None:
    source = record["sources"].get(name)
    if source is None:
        return None
    path = Path(source["path"])
    if not path.exists():
        return f"{what} {path} is no longer there"
    now = sha256_path(path)
    if now != source["sha256"]:
        return f"{what} {path} changed: sha256 {now[:16]}... now, {source['sha256'][:16]}... when recorded"
    return None


def differences(record: dict[str, Any]) -> dict[str, list[str]]:
    """What differs between the record and this machine, found from hashes and versions only (no computing)."""
    from ..engine.methods import get_method
    from .record import library_versions

    found: dict[str, list[str]] = {"input": [], "model": [], "versions": [], "settings": []}
    for name, what, kind in (("volume", "volume file", "input"), ("mask", "target mask file", "input"),
                             ("reference_mask", "reference mask file", "input"), ("model", "model file", "model")):
        change = _file_changed(record, name, what)
        if change:
            found[kind].append(change)
    card_path = record["model"].get("card_path")
    weights = record["model"]["card"].get("weights")
    if card_path and weights:  # the card names the weights: a replaced weights file is a changed model too
        path = Path(card_path).parent / weights
        now_sha = sha256_path(path) if path.exists() else None
        if now_sha != record["model"]["sha256"]:
            found["model"].append(f"model weights {path} " + ("are no longer there" if now_sha is None else
                                  f"changed: sha256 {now_sha[:16]}... now, {record['model']['sha256'][:16]}... "
                                  "when recorded"))
    now = library_versions()
    for name, then in sorted(record.get("versions", {}).items()):
        if now.get(name) != then:
            found["versions"].append(f"{name} {then} when recorded, {now.get(name, 'not installed')} now")
    settings = record["method"]["settings"]
    try:
        current = get_method(record["method"]["name"]).validate(settings)
    except MethodError as exc:  # a setting was renamed or removed, or the method itself
        found["settings"].append(f"the recorded method and settings are no longer accepted: {exc}")
        current = settings
    if current != settings:
        changed = sorted(set(current) ^ set(settings) | {k for k in current if current.get(k) != settings.get(k)})
        found["settings"].append(f"method {record['method']['name']!r} now resolves its settings differently "
                                 f"({', '.join(changed)})")
    return {kind: lines for kind, lines in found.items() if lines}


def _region(spec: dict[str, Any], record: dict[str, Any]):
    from ..engine.geometry import Box, read_volume
    from ..engine.targets import BoxRegion, ComponentRegion, MaskRegion, VoxelRegion, WholeVolume

    kind = spec["type"]
    if kind == "box":
        return BoxRegion(Box(spec["lo"], spec["hi"]))
    if kind in ("voxel", "component"):
        return (VoxelRegion if kind == "voxel" else ComponentRegion)(tuple(spec["ijk"]))
    if kind == "mask":
        mask = read_volume(record["sources"]["mask"]["path"])
        return MaskRegion(np.asarray(mask.array) > 0)
    if kind == "whole":
        return WholeVolume()
    raise InputError(f"The record's target region {spec!r} cannot be re-made outside the run that fixed it.")


def _compare(name: str, recorded, new, tolerance: float, result: Reproduction) -> None:
    if recorded.shape != new.shape or not np.array_equal(recorded.ijk_to_ras, new.ijk_to_ras):
        result.outputs[name] = float("inf")
        result.mismatches.append(f"{name}: shape or geometry differs ({recorded.shape} recorded, {new.shape} now)")
        return
    a = np.asarray(recorded.array, np.float64)
    b = np.asarray(new.array, np.float64)
    # NaN marks voxels a run did not predict (a ROI run's confidence): the same voxels must be NaN in both.
    known = ~np.isnan(a)
    if not np.array_equal(known, ~np.isnan(b)):
        result.outputs[name] = float("inf")
        result.mismatches.append(f"{name}: the voxels without a value (NaN, not predicted) differ")
        return
    diff = float(np.max(np.abs(a - b)[known])) if known.any() else 0.0
    result.outputs[name] = diff
    scale = float(np.max(np.abs(a[known]))) if known.any() else 0.0
    same = (np.array_equal(recorded.array, new.array, equal_nan=True) if tolerance == 0
            else diff <= tolerance * max(scale, 1e-30))
    if not same:
        result.mismatches.append(f"{name}: largest difference {diff:.3g} (map's largest |value| {scale:.3g}, "
                                 f"tolerance {'bit-identical' if tolerance == 0 else f'{tolerance:g} of it'})")


def reproduce(run_dir: str | Path, device: str | None = None, tolerance: float | None = None) -> Reproduction:
    """Re-run the run recorded in ``run_dir`` (on its recorded device unless ``device``) and compare.

    ``tolerance`` (a fraction of the recorded map's largest magnitude) defaults to 0 on CPU (bit-identical) and to
    :data:`GPU_TOLERANCE` on a GPU."""
    from ..engine.explain import Explainer
    from ..engine.geometry import read_volume
    from ..engine.models import load_model
    from ..engine.targets import Target
    from .sources import recorded_volume

    run_dir = Path(run_dir)
    record = _load_record(run_dir)
    result = Reproduction(run_dir, differences(record))
    result.device = device or re.sub(r"\s*\(.*\)$", "", record.get("device", "cpu"))
    result.tolerance = (0.0 if result.device == "cpu" else GPU_TOLERANCE) if tolerance is None else tolerance
    if result.differences.get("input") or result.differences.get("model"):
        return result
    volume = recorded_volume(record)
    model = load_model(record["sources"]["model"]["path"])
    window = record["window"]
    explainer = Explainer(model, device=result.device, precision=record.get("precision", "fp32"),
                          memory_mb=window.get("memory_mb"), overlap=window.get("overlap", 0.25),
                          blend=window.get("blend"), halo=window.get("halo"),
                          min_tile_share=window.get("min_tile_share", 0.01))
    target = record["target"]
    region = _region(target["region_spec"], record)
    new = explainer.explain(volume, record["method"]["name"],
                            Target(target["class"], target.get("contrast"), region, target.get("score", "logit")),
                            layer=record["method"].get("layer"), settings=record["method"]["settings"],
                            seed=int(record["seed"]), output=record.get("output", "full"))
    result.rerun = True
    if new.input_sha256 != record["input"]["sha256"]:
        result.mismatches.append("input: the volume read now hashes differently from the recorded voxels")
    outputs = record.get("outputs", {})
    for name, made in (("attribution", new.attribution), ("confidence", new.confidence)):
        if name in outputs:
            path = regular_file(run_dir / outputs[name], f"Recorded {name}", InputError)
            if made is None:
                result.mismatches.append(f"{name}: recorded, but the re-run made none")
            else:
                _compare(name, read_volume(path), made, result.tolerance, result)
    # Within a tolerance the prediction's probabilities may differ in their last digits: only the maps are compared.
    if result.tolerance == 0 and json.loads(json.dumps(new.prediction)) != record.get("prediction"):
        result.mismatches.append("prediction: the re-run predicts differently (see run.json's 'prediction')")
    return result
