"""The persistent torch worker: ``python -m CTXAILib.worker``, started by the Slicer module (or any client).

It keeps loaded models warm on their device between runs and speaks JSON lines: requests on stdin, replies on
stdout (``ready``, then per request ``progress`` lines and one ``result``, ``error`` or ``cancelled``). Arrays travel
through ``.npy`` files in a private folder that the client names, never through the pipe. It listens on no network
port. A ``cancel`` request is read by a second thread while a run is going on and takes effect at the run's next
batch; anything else waits its turn. Everything the libraries print goes to stderr so that stdout carries protocol
lines only.

Requests (``id`` is chosen by the client and echoed in every reply):

- ``{"id", "cmd": "explain", "model", "volume": {"path", "spacing", "origin", "directions"}, "method",
  "target": {"class", "contrast", "score", "region": {"type": "whole" | "box" | "voxel" | "component" | "mask",
  ...}}, "layer", "settings", "device", "precision", "memory_mb", "seed", "output", "quality", "out_dir"}``
- ``{"id", "cmd": "describe_model", "model", "device"}`` -- card, layers and default CAM layer
- ``{"id", "cmd": "methods"}`` -- the method registry (the panel builds its controls from it)
- ``{"cmd": "cancel", "id"}`` and ``{"cmd": "shutdown"}``
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["Worker", "main", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 1


def save_array(array: np.ndarray, path: Path) -> str:
    """Write ``array`` as ``.npy`` atomically (readers never see a partial file)."""
    from ..engine.geometry import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
    return str(path)


class Worker:
    """Serves requests from ``inbox`` lines and writes replies to ``out``; one run at a time."""

    def __init__(self, out: TextIO):
        self.out = out
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
            command = request.get("cmd")
            handler = {"explain": self._explain, "describe_model": self._describe_model,
                       "methods": self._methods}.get(command)
            if handler is None:
                raise ValueError(f"Unknown command {command!r}")
            result = handler(request, job, cancel)
            self.send({"id": job, "type": "result", "result": result})
        except Cancelled:
            self.send({"id": job, "type": "cancelled"})
        except CTXAIError as exc:
            self.send({"id": job, "type": "error", "error": type(exc).__name__, "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - a bug must reach the user as a message, and the worker live on
            self.send({"id": job, "type": "error", "error": type(exc).__name__,
                       "message": f"Internal error: {exc}", "traceback": traceback.format_exc()})
        finally:
            self._cancel.pop(job, None)

    def explainer(self, model: str, device: str = "auto", precision: str = "fp32",
                  memory_mb: float | None = None) -> tuple[Any, bool]:
        """The cached explainer of a model file, reloaded only when the file or the device changed; and whether
        it was reused. Precision and memory budget are run settings: they never force a reload."""
        from ..engine.explain import Explainer
        from ..engine.runtime import MemoryBudget

        path = Path(model).resolve()
        key = (str(path), path.stat().st_mtime_ns if path.exists() else 0, device)
        explainer = self._explainers.get(key)
        if explainer is not None:
            explainer.precision = precision
            explainer.budget = MemoryBudget.default(explainer.device, memory_mb)
            return explainer, True
        explainer = Explainer(path, device=device, precision=precision, memory_mb=memory_mb)
        # One warm model per file: a changed file or another device replaces the previous entry.
        self._explainers = {k: v for k, v in self._explainers.items() if k[0] != key[0]}
        self._explainers[key] = explainer
        return explainer, False

    def _describe_model(self, request: dict, job: str, cancel: threading.Event) -> dict:
        explainer, reused = self.explainer(request["model"], request.get("device", "auto"))
        model = explainer.model
        return {"card": model.card.to_dict(), "sha256": model.sha256, "torchscript": model.is_torchscript,
                "default_layer": model.default_layer(), "warnings": model.warnings, "device": str(explainer.device),
                "layers": [{"name": i.name, "type": i.type, "output_shape": i.output_shape,
                            "cam_usable": i.spatial} for i in model.layers()],
                "model_reused": reused}

    def _methods(self, request: dict, job: str, cancel: threading.Event) -> list:
        from ..engine.methods import list_methods

        return [spec.to_dict() for spec in list_methods()]

    def _explain(self, request: dict, job: str, cancel: threading.Event) -> dict:
        from ..checks.faithfulness import faithfulness_check
        from ..engine.geometry import Box, Volume
        from ..engine.targets import BoxRegion, ComponentRegion, MaskRegion, Target, VoxelRegion, WholeVolume
        from ..records.record import run_record

        explainer, reused = self.explainer(request["model"], request.get("device", "auto"),
                                           request.get("precision", "fp32"), request.get("memory_mb"))
        spec = request["volume"]
        volume = Volume(np.load(spec["path"], allow_pickle=False), spec["spacing"], spec["origin"],
                        spec["directions"])
        target_spec = request.get("target") or {}
        region_spec = target_spec.get("region") or {"type": "whole"}
        kind = region_spec.get("type", "whole")
        if kind == "box":
            region = BoxRegion(Box(region_spec["lo"], region_spec["hi"]))
        elif kind in ("voxel", "component"):
            region = (VoxelRegion if kind == "voxel" else ComponentRegion)(tuple(region_spec["ijk"]))
        elif kind == "mask":
            region = MaskRegion(np.load(region_spec["path"], allow_pickle=False) > 0)
        else:
            region = WholeVolume()
        target = Target(target_spec.get("class"), target_spec.get("contrast"), region,
                        target_spec.get("score", "logit"))

        def progress(p) -> None:
            self.send({"id": job, "type": "progress", "fraction": p.fraction, "message": p.message,
                       "eta_s": p.eta_s})

        result = explainer.explain(volume, request["method"], target, layer=request.get("layer"),
                                   settings=request.get("settings"), progress=progress, cancel=cancel,
                                   seed=int(request.get("seed", 0)), output=request.get("output", "full"),
                                   evaluate=faithfulness_check if request.get("quality") else None)
        out_dir = Path(request["out_dir"])
        outputs = {"attribution": self._volume_file(result.attribution, out_dir / f"{job}-attribution.npy")}
        if result.confidence is not None:
            outputs["confidence"] = self._volume_file(result.confidence, out_dir / f"{job}-confidence.npy")
        record = run_record(result, volume, explainer.model, outputs={k: v["path"] for k, v in outputs.items()})
        return {**outputs, "record": record, "model_reused": reused,
                "explanation": {"method": result.method, "sign": result.sign, "signed": result.signed,
                                "family": result.family, "settings": result.settings, "target": result.target,
                                "layer": result.layer,
                                "prediction": result.prediction, "timings": result.timings,
                                "quality": result.quality,
                                "extent": {"lo": list(result.extent.lo), "hi": list(result.extent.hi)},
                                "device": result.device, "warnings": result.warnings,
                                "model": explainer.model.card.name}}

    @staticmethod
    def _volume_file(volume, path: Path) -> dict:
        return {"path": save_array(volume.array, path), "spacing": list(volume.spacing),
                "origin": list(volume.origin), "directions": volume.directions.tolist()}


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
