"""What a batch worker process does: load the model once, then predict scans and explain items as they come.

Both engines (the local process pool and Ray) run these same functions in their worker processes, so that a batch
gives the same table on either. A task never raises: its outcome says ``ok`` or carries the one-line error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import CTXAIError, InputError

__all__ = ["start_worker", "call", "run_summary", "one_line"]

_STATE: dict[str, Any] = {}


def start_worker(setup: dict[str, Any]) -> None:
    """Load the model of ``setup`` (``model``, ``device``, ``threads``, ``memory_mb``) into this process."""
    import torch

    from ..engine.explain import Explainer

    if setup.get("threads"):
        torch.set_num_threads(int(setup["threads"]))
    _STATE.clear()
    _STATE["explainer"] = Explainer(setup["model"], device=setup.get("device", "auto"),
                                    memory_mb=setup.get("memory_mb"))


def one_line(exc: BaseException) -> str:
    """An error as the batch table's one line: our errors say what and how to fix; others name their type."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, CTXAIError) else f"{type(exc).__name__}: {text or 'no message'}"


def call(task: str, index: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Run ``task`` ("predict" or "explain") on ``payload``; returns ``(index, outcome)``."""
    started = time.perf_counter()
    try:
        outcome = dict(_TASKS[task](payload), ok=True)
    except Exception as exc:  # noqa: BLE001 - one item's failure is recorded in the table; the batch goes on
        outcome = {"ok": False, "error": one_line(exc)}
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    return index, outcome


def _volume(payload: dict[str, Any]):
    from ..engine.geometry import read_volume

    source = (payload["volume"], payload.get("series"), payload.get("spacing"))
    cached = _STATE.get("volume")
    if cached is None or cached[0] != source:
        _STATE["volume"] = (source, read_volume(*source))
    return _STATE["volume"][1]


def _where(payload: dict[str, Any], volume) -> Any:
    """The voxels (k, j, i) a scan's regions must touch, or None for the whole scan."""
    import numpy as np

    from ..engine.geometry import Box, read_volume
    from ..engine.targets import VoxelRegion

    if payload.get("mask"):
        mask = read_volume(payload["mask"])
        if not mask.same_geometry(volume):
            raise InputError(f"Mask {payload['mask']} does not have the geometry of volume {payload['volume']} "
                             "(shape and IJK-to-RAS must match). Resample the mask onto the volume first.")
        return np.asarray(mask.array) > 0
    box = None
    if payload.get("roi"):
        box = Box.from_corners(payload["roi"])
        box.check_inside(volume.shape)
        box = box.clip(volume.shape)
    elif payload.get("point"):
        box = VoxelRegion(tuple(payload["point"])).resolve(volume.shape)[0]
    if box is None:
        return None
    where = np.zeros(volume.shape, bool)
    where[box.slices] = True
    return where


def _regions(explainer, volume, prepared, where, min_voxels: int) -> list[dict[str, Any]]:
    """The predicted regions: connected components (26-neighbourhood, as a clicked component) of each foreground
    class, in class order then raster order, numbered from 1."""
    import numpy as np
    from scipy import ndimage

    card = explainer.model.card
    probabilities = explainer.segmentation_probabilities(prepared)
    first = 1 if card.output_activation == "softmax" else 0  # softmax models keep class 0 for the background
    regions: list[dict[str, Any]] = []
    for index in range(first, len(card.class_names)):
        labels, count = ndimage.label(explainer.class_mask(volume, index), structure=np.ones((3, 3, 3), bool))
        if not count:
            continue
        ids = np.arange(1, count + 1)
        p = probabilities[index].astype(np.float32)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        means, maxima = ndimage.mean(p, labels, ids), ndimage.maximum(p, labels, ids)
        peaks, centres = ndimage.maximum_position(p, labels, ids), ndimage.center_of_mass(labels > 0, labels, ids)
        for n, box in enumerate(ndimage.find_objects(labels)):
            if sizes[n] < min_voxels or (where is not None and not where[box][labels[box] == n + 1].any()):
                continue
            regions.append({
                "defect_id": len(regions) + 1, "class": card.class_names[index], "voxels": int(sizes[n]),
                "centre_ijk": [round(float(c), 2) for c in reversed(centres[n])],
                "bbox_ijk": [s.start for s in reversed(box)] + [s.stop for s in reversed(box)],
                "mean_confidence": round(float(means[n]), 6), "max_confidence": round(float(maxima[n]), 6),
                "point_ijk": [int(v) for v in reversed(peaks[n])]})
    return regions


def _predict(payload: dict[str, Any]) -> dict[str, Any]:
    """Hash a scan and list its regions; a ``prediction.json`` of the same input, model and limits is reused."""
    from ..records.record import write_json

    explainer = _STATE["explainer"]
    volume = _volume(payload)
    prepared = explainer.prepare(volume)
    wanted = {"input_sha256": prepared.sha256, "model_sha256": explainer.model.sha256,
              "min_voxels": payload["min_voxels"], "limit": {k: payload.get(k) for k in ("mask", "roi", "point")}}
    path = Path(payload["scan_dir"]) / "prediction.json"
    try:
        previous = json.loads(path.read_text())
        if all(previous.get(k) == v for k, v in wanted.items()):
            return {"input_sha256": prepared.sha256, "regions": previous["regions"], "reused": True}
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # none yet, or not of this input: predict
    if explainer.model.card.task != "segmentation":
        regions = []
    else:
        regions = _regions(explainer, volume, prepared, _where(payload, volume), payload["min_voxels"])
    write_json({"format": "ctxai-prediction/1", "part_id": payload["part_id"], "volume": payload["volume"],
                "model": explainer.model.card.name, **wanted, "regions": regions}, path)
    return {"input_sha256": prepared.sha256, "regions": regions, "reused": False}


def run_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the batch table keeps of a finished run's record (``run.json``)."""
    checks = record.get("checks") or {}
    prediction = record.get("prediction") or {}
    return {"verdict": (record.get("verdict") or {}).get("verdict"),
            "checks": {name: check.get("pass") for name, check in checks.items()},
            "class": (record.get("target") or {}).get("class"),
            "target_probability": prediction.get("target_probability"),
            "run_seconds": (record.get("batch") or {}).get("seconds")}


def _explain(payload: dict[str, Any]) -> dict[str, Any]:
    """Explain one item and write its run folder as ``ctxai explain`` does, with the batch's key in the record."""
    from ..checks.runner import explain_and_check
    from ..engine.targets import Target, parse_region
    from ..records.outputs import claim_output_folder, write_explanation

    explainer = _STATE["explainer"]
    model = explainer.model
    volume = _volume(payload)
    target = payload["target"]
    region = parse_region(target.get("roi"), target.get("point"))
    started = time.perf_counter()
    result, verified = explain_and_check(explainer, volume, payload["method"], Target(target.get("class"),
                                                                                     region=region),
                                         checks=payload["checks"], settings=payload["settings"],
                                         seed=payload["seed"])
    run_dir = claim_output_folder(payload["run_dir"], [payload["volume"], model.card.path, model.card.weights_path],
                                  True, payload["started"])
    batch = dict(payload["record"], seconds=round(time.perf_counter() - started, 3))
    written = write_explanation(result, volume, model, run_dir, extra={**verified, "batch": batch},
                                sources={"volume": payload["volume"], "model": model.card.path},
                                audit_log=payload["audit_log"])
    return run_summary(json.loads(Path(written["record"]).read_text()))


_TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"predict": _predict, "explain": _explain}
