"""The persistent torch worker: ``python -m CTXAILib.worker``, started by the Slicer module (or any client).

It keeps loaded models warm on their device between runs and speaks JSON lines: requests on stdin, replies on
stdout (``ready``, then per request ``progress`` lines and one ``result``, ``error`` or ``cancelled``). Arrays travel
through ``.npy`` files in a private folder that the client names, never through the pipe. It listens on no network
port. A ``cancel`` request is read by a second thread while a run is going on and takes effect at the run's next
batch; anything else waits its turn. Everything the libraries print goes to stderr so that stdout carries protocol
lines only.

The client starts the worker in its private exchange folder: every array path and ``out_dir`` of a request must lie
inside it, and a job id names files there, so it is a plain name. A malformed request gets a ``ProtocolError``
reply and the worker goes on.

Requests (``id`` is chosen by the client and echoed in every reply):

- ``{"id", "cmd": "explain", "model", "volume": {"path", "spacing", "origin", "directions"}, "method",
  "target": {"class", "contrast", "score", "region": {"type": "whole" | "box" | "voxel" | "component" | "mask",
  ...}}, "layer", "settings", "device", "precision", "memory_mb", "overlap" and "blend" (the sliding window; absent:
  the card's), "seed", "output", "checks" (names; the result carries ``checks`` and a ``verdict``), "quality" (adds
  faithfulness), "out_dir", "audit_log" (the log the run is appended to; default: ``$CTXAI_AUDIT_LOG``, else the
  per-user log)}``
- ``{"id", "cmd": "describe_model", "model", "device"}`` -- card, layers and default CAM layer
- ``model`` is a card, a weights file or a MONAI bundle folder; ``"trust_bundle_code": true`` (explain and
  describe_model) lets the bundle's Python expressions run, as ``--trust-bundle-code`` does
- ``{"id", "cmd": "methods"}`` -- the method registry (the panel builds its controls from it)
- ``{"cmd": "cancel", "id"}`` and ``{"cmd": "shutdown"}``
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["Worker", "main", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 1

# The fields each command needs; the others have defaults.
_REQUIRED = {"explain": ("model", "volume", "method", "out_dir"), "describe_model": ("model",), "methods": ()}
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_REGION_FIELDS = {"whole": (), "box": ("lo", "hi"), "voxel": ("ijk",), "component": ("ijk",), "mask": ("path",)}


def save_array(array: np.ndarray, path: Path) -> str:
    """Write ``array`` as ``.npy`` atomically (readers never see a partial file)."""
    from ..engine.geometry import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
    return str(path)


class Worker:
    """Serves requests from ``inbox`` lines and writes replies to ``out``; one run at a time."""

    def __init__(self, out: TextIO, exchange: str | os.PathLike | None = None):
        self.out = out
        self.exchange = Path(exchange or Path.cwd()).resolve()
        self._write_lock = threading.Lock()
        self._jobs: "queue.Queue[dict]" = queue.Queue()
        self._cancel: dict[str, threading.Event] = {}
        self._explainers: dict[tuple, Any] = {}

    def send(self, message: dict[str, Any]) -> None:
        with self._write_lock:
            self.out.write(json.dumps(message, default=str) + "\n")
            self.out.flush()

    # ---------------------------------------------------------------------------------------- reading
    def read(self, inbox: TextIO) -> None:
        """Reader thread: cancel takes effect at once, everything else is queued; EOF means the client left."""
        for line in inbox:
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
            except json.JSONDecodeError as exc:
                self.send({"type": "error", "error": "ProtocolError", "message": f"Bad request line: {exc}"})
                continue
            if not isinstance(request, dict):
                self.send({"type": "error", "error": "ProtocolError", "message": "Bad request line: a request is "
                           f"a JSON object with 'cmd' and 'id', got {type(request).__name__} {line[:80]}"})
                continue
            if request.get("cmd") == "cancel":
                self._cancel.setdefault(str(request.get("id")), threading.Event()).set()
                continue
            self._jobs.put(request)
            if request.get("cmd") == "shutdown":
                return
        self._jobs.put({"cmd": "shutdown"})

    def serve(self) -> None:
        self.send({"type": "ready", "pid": os.getpid(), "protocol": PROTOCOL_VERSION})
        while True:
            request = self._jobs.get()
            if request.get("cmd") == "shutdown":
                return
            self.handle(request)

    # --------------------------------------------------------------------------------------- handling
    def handle(self, request: dict[str, Any]) -> None:
        job = str(request.get("id"))
        cancel = self._cancel.setdefault(job, threading.Event())
        from ..errors import Cancelled, CTXAIError

        try:
            self._validate(request, job)
            handler = {"explain": self._explain, "describe_model": self._describe_model,
                       "methods": self._methods}[request["cmd"]]
            result = handler(request, job, cancel)
            self.send({"id": job, "type": "result", "result": result})
        except Cancelled:
            self.send({"id": job, "type": "cancelled"})
        except CTXAIError as exc:
            self.send({"id": job, "type": "error", "error": type(exc).__name__, "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - a bug must reach the user as a message, and the worker live on
            traceback.print_exc(file=sys.stderr)  # the client keeps the worker's stderr as its log
            self.send({"id": job, "type": "error", "error": type(exc).__name__,
                       "message": f"Internal error: {exc} (the traceback is in the worker's log)"})
        finally:
            self._cancel.pop(job, None)

    def _validate(self, request: dict[str, Any], job: str) -> None:
        from ..errors import ProtocolError

        command = request.get("cmd")
        if command not in _REQUIRED:
            raise ProtocolError(f"Unknown command {command!r}; the worker knows {', '.join(_REQUIRED)}, cancel and "
                                "shutdown.")
        missing = [key for key in _REQUIRED[command] if request.get(key) is None]
        if missing:
            raise ProtocolError(f"Request {command!r} has no {', '.join(map(repr, missing))}. Send every field the "
                                "protocol lists (CTXAILib/worker/server.py).")
        if command == "explain":
            if not _JOB_ID.fullmatch(job):
                raise ProtocolError(f"Job id {job[:80]!r} is not a plain name (letters, digits, '_', '.', '-'): it "
                                    "names the result files in the exchange folder.")
            volume = request["volume"]
            if not isinstance(volume, dict) or not {"path", "spacing", "origin", "directions"} <= volume.keys():
                raise ProtocolError("Request 'explain' needs 'volume' as {path, spacing, origin, directions}.")
            region = (request.get("target") or {}).get("region") or {"type": "whole"}
            kind = region.get("type", "whole") if isinstance(region, dict) else None
            if kind not in _REGION_FIELDS or not all(key in region for key in _REGION_FIELDS[kind]):
                raise ProtocolError(f"Target region {region!r} is not one of: " + "; ".join(
                    f"{{'type': {name!r}{''.join(f', {key!r}: ...' for key in keys)}}}"
                    for name, keys in _REGION_FIELDS.items()) + ".")

    def _exchange_path(self, path: str, what: str) -> Path:
        """``path`` resolved, when it lies inside the exchange folder: the worker reads and writes nowhere else."""
        from ..errors import ProtocolError

        resolved = (self.exchange / path).resolve()
        if not resolved.is_relative_to(self.exchange):
            raise ProtocolError(f"{what} {path} is outside the worker's exchange folder {self.exchange}; write it "
                                "there.")
        return resolved

    def _load_array(self, path: str, what: str) -> np.ndarray:
        from ..engine.files import regular_file
        from ..errors import InputError

        path = regular_file(self._exchange_path(path, what), what, InputError)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"{what} {path} is not a .npy array ({exc}). Write it with numpy.save.") from None
        if not isinstance(array, np.ndarray):
            raise InputError(f"{what} {path} holds several arrays (.npz), not one. Write it with numpy.save.")
        return array

    def explainer(self, model: str, device: str = "auto", precision: str = "fp32",
                  memory_mb: float | None = None, trust_code: bool = False, fold: int | str | None = None,
                  overlap: float | None = None, blend: str | None = None) -> tuple[Any, bool]:
        """The cached explainer of a model file (or folder: a bundle, an nnU-Net results folder and ``fold``),
        reloaded only when the file (any file of a folder), the device, the fold or the trust in a bundle's code
        changed; and whether it was reused. Precision, memory budget and sliding window (None: the card's) are run
        settings: they never force a reload."""
        from ..engine.explain import Explainer
        from ..engine.models import load_model
        from ..engine.runtime import MemoryBudget

        path = Path(model).resolve()
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
        key = (str(path), max((p.stat().st_mtime_ns for p in files), default=0), device, bool(trust_code), fold)
        explainer = self._explainers.get(key)
        if explainer is not None:
            explainer.precision = precision
            explainer.budget = MemoryBudget.default(explainer.device, memory_mb)
            explainer.set_sliding_window(overlap, blend)
            return explainer, True
        explainer = Explainer(load_model(path, trust_code=bool(trust_code), fold=fold), device=device,
                              precision=precision, memory_mb=memory_mb, overlap=overlap, blend=blend)
        # One warm model per file: a changed file or another device replaces the previous entry.
        self._explainers = {k: v for k, v in self._explainers.items() if k[0] != key[0]}
        self._explainers[key] = explainer
        return explainer, False

    def _describe_model(self, request: dict, job: str, cancel: threading.Event) -> dict:
        from ..checks.profile import read_profile

        explainer, reused = self.explainer(request["model"], request.get("device", "auto"),
                                           trust_code=request.get("trust_bundle_code", False),
                                           fold=request.get("fold"))
        model = explainer.model
        profile = read_profile(request["model"], model.sha256) if str(request["model"]).endswith(".json") else None
        return {"card": model.card.to_dict(), "sha256": model.sha256, "torchscript": model.is_torchscript,
                "layer_access": model.layer_access(), "layer_methods": model.hookable,
                "default_layer": model.default_layer(), "warnings": model.warnings, "device": str(explainer.device),
                "layers": [{"name": i.name, "type": i.type, "output_shape": i.output_shape,
                            "cam_usable": i.spatial} for i in model.layers()],
                "runtime": _runtime(explainer.device),
                "advice": {name: {"recommendation": entry["recommendation"], "why": entry["why"]}
                           for name, entry in (profile or {}).get("methods", {}).items()},
                "model_reused": reused}

    def _methods(self, request: dict, job: str, cancel: threading.Event) -> list:
        from ..engine.methods import list_methods

        return [spec.to_dict() for spec in list_methods()]

    def _explain(self, request: dict, job: str, cancel: threading.Event) -> dict:
        from ..checks.runner import explain_and_check
        from ..engine.geometry import Box, Volume
        from ..engine.targets import BoxRegion, ComponentRegion, MaskRegion, Target, VoxelRegion, WholeVolume
        from ..records.audit import append_entry, audit_entry, log_path
        from ..records.record import run_record

        explainer, reused = self.explainer(request["model"], request.get("device", "auto"),
                                           request.get("precision", "fp32"), request.get("memory_mb"),
                                           request.get("trust_bundle_code", False), request.get("fold"),
                                           request.get("overlap"), request.get("blend"))
        spec = request["volume"]
        out_dir = self._exchange_path(request["out_dir"], "Output folder")
        volume = Volume(self._load_array(spec["path"], "Volume array"), spec["spacing"], spec["origin"],
                        spec["directions"])
        target_spec = request.get("target") or {}
        region_spec = target_spec.get("region") or {"type": "whole"}
        kind = region_spec.get("type", "whole")
        if kind == "box":
            region = BoxRegion(Box(region_spec["lo"], region_spec["hi"]))
        elif kind in ("voxel", "component"):
            region = (VoxelRegion if kind == "voxel" else ComponentRegion)(tuple(region_spec["ijk"]))
        elif kind == "mask":
            region = MaskRegion(self._load_array(region_spec["path"], "Mask array") > 0)
        else:
            region = WholeVolume()
        target = Target(target_spec.get("class"), target_spec.get("contrast"), region,
                        target_spec.get("score", "logit"))

        def progress(p) -> None:
            self.send({"id": job, "type": "progress", "fraction": p.fraction, "message": p.message,
                       "eta_s": p.eta_s})

        checks = list(request.get("checks") or []) + (["faithfulness"] if request.get("quality") else [])

        def report(message: str) -> None:  # checks re-run the method: say which, the bar stays full meanwhile
            self.send({"id": job, "type": "progress", "fraction": 1.0, "message": message, "eta_s": None})

        result, verified = explain_and_check(explainer, volume, request["method"], target, checks=checks,
                                             layer=request.get("layer"), settings=request.get("settings"),
                                             seed=int(request.get("seed", 0)), progress=progress, cancel=cancel,
                                             output=request.get("output", "full"), report=report)
        outputs = {"attribution": self._volume_file(result.attribution, out_dir / f"{job}-attribution.npy")}
        if result.confidence is not None:
            outputs["confidence"] = self._volume_file(result.confidence, out_dir / f"{job}-confidence.npy")
        record = run_record(result, volume, explainer.model, outputs={k: v["path"] for k, v in outputs.items()},
                            sources={"model": request["model"]})
        record.update(verified)
        # The outputs are exchange files the client removes once it has read them: the entry keeps their hashes.
        append_entry(log_path(request.get("audit_log")),
                     audit_entry(record, {k: v["path"] for k, v in outputs.items()}))
        return {**outputs, "record": record, "model_reused": reused,
                "explanation": {"method": result.method, "sign": result.sign, "signed": result.signed,
                                "family": result.family, "settings": result.settings, "target": result.target,
                                "layer": result.layer,
                                "prediction": result.prediction, "timings": result.timings,
                                "quality": result.quality, **verified,
                                "extent": {"lo": list(result.extent.lo), "hi": list(result.extent.hi)},
                                "device": result.device, "warnings": result.warnings,
                                "model": explainer.model.card.name}}

    @staticmethod
    def _volume_file(volume, path: Path) -> dict:
        return {"path": save_array(volume.array, path), "spacing": list(volume.spacing),
                "origin": list(volume.origin), "directions": volume.directions.tolist()}


def _runtime(device) -> dict[str, Any]:
    """Which torch and accelerator the worker runs on: the panel says it, since Slicer's process never imports
    torch and cannot tell."""
    import torch

    runtime = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        runtime["device_name"] = torch.cuda.get_device_name(device)
    return runtime


def main() -> int:
    # Keep stdout for protocol lines: libraries (Captum, warnings, C extensions) print to file descriptor 1 too.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    worker = Worker(protocol)
    reader = threading.Thread(target=worker.read, args=(sys.stdin,), daemon=True, name="ctxai-worker-reader")
    reader.start()
    worker.serve()
    return 0
