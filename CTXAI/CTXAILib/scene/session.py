"""The Slicer module's logic without Qt: MRML nodes in, a run in the worker, result nodes out.

:class:`ExplainSession` owns one :class:`~CTXAILib.client.WorkerClient`. :meth:`ExplainSession.start` reads the
nodes and sends the request; :meth:`ExplainSession.poll` never blocks, and when a result arrives it builds the
result nodes through the scene bridge on the calling thread (the GUI thread in Slicer, where MRML must be touched).
:meth:`ExplainSession.explain` is the blocking form behind the console API. A failed or cancelled run adds nothing
to the scene.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import Cancelled, InputError, RegionError
from ..worker.client import WorkerClient, WorkerError, volume_from_message, volume_message
from . import bridge

__all__ = ["ExplainRequest", "SessionEvent", "ExplainSession", "WHERE"]

WHERE = ("whole", "roi", "point")


@dataclass
class ExplainRequest:
    """Everything one Explain needs, by node ID and value (what the panel's parameter node holds)."""

    input_volume: str
    model: str
    method: str
    target_class: str | None = None
    contrast_class: str | None = None
    score: str = "logit"
    where: str = "whole"            # whole volume, a markups ROI, or a clicked point
    roi: str | None = None          # vtkMRMLMarkupsROINode ID
    point: str | None = None        # markups point-list node ID; its last control point is used
    component: bool = True          # a point on a segmentation model selects the predicted defect containing it
    layer: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    precision: str = "fp32"
    overlap: float | None = None    # sliding window; None: the model card's
    blend: str | None = None
    opacity: float = 0.5
    top_percent: float = 5.0
    colormap: str = "auto"
    render_3d: bool = True
    seed: int = 0
    # Checks of the map, run by the worker after it: by default the cheap ones (CTXAILib.checks.runner.CHEAP_CHECKS,
    # at most one more run of the method); "all" or any names of `ctxai checks`.
    checks: tuple[str, ...] = ("spill", "target_sensitivity")
    # The audit log the run is appended to; None: $CTXAI_AUDIT_LOG, else the per-user log (CTXAILib.records.audit).
    audit_log: str | None = None


@dataclass
class SessionEvent:
    """What :meth:`ExplainSession.poll` reports: progress, a finished run, an error or a cancellation."""

    kind: str                        # progress | result | error | cancelled
    job: str
    fraction: float = 0.0
    message: str = ""
    eta_s: float | None = None
    run: bridge.RunNodes | None = None
    error_type: str | None = None


class ExplainSession:
    """One worker, one scene. See the module docstring.

    >>> session = ExplainSession(scene)                                            # doctest: +SKIP
    >>> run = session.explain(ExplainRequest(ct.GetID(), "unet.json", "gradcam", "void", where="point",
    ...                                      point=clicked.GetID()))               # doctest: +SKIP
    """

    def __init__(self, scene, client: WorkerClient | None = None, volume_rendering_logic=None):
        self.scene = scene
        self.client = client or WorkerClient()
        self.volume_rendering_logic = volume_rendering_logic
        self._jobs: dict[str, ExplainRequest] = {}
        self._inputs: dict[str, Path] = {}
        self._descriptions: dict[tuple, dict] = {}
        self._methods: list[dict] | None = None
        self._undelivered: list[SessionEvent] = []   # outcomes of runs that shutdown() ended, for the next poll

    # ----------------------------------------------------------------------------------------- models
    def describe_model(self, path: str, device: str = "auto") -> dict:
        """Card, layers and default CAM layer of a model file, from the worker (cached per file version)."""
        resolved = Path(path).resolve()
        if not resolved.exists():
            raise InputError(f"Model file {path} does not exist. Pick a model card (.json) or weights file.")
        key = (str(resolved), resolved.stat().st_mtime_ns, device)
        if key not in self._descriptions:
            self._descriptions[key] = self.client.call("describe_model", model=str(resolved), device=device)
        return self._descriptions[key]

    def methods(self) -> list[dict]:
        """The method registry (names, families, settings with defaults, ranges and help)."""
        if self._methods is None:
            self._methods = self.client.call("methods")
        return self._methods

    # ------------------------------------------------------------------------------------------- runs
    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def _node(self, node_id: str | None, what: str, fix: str):
        node = self.scene.GetNodeByID(node_id) if node_id else None
        if node is None:
            raise InputError(f"No {what} is selected. {fix}")
        return node

    def _region(self, request: ExplainRequest, volume_node) -> dict:
        if request.where not in WHERE:
            raise InputError(f"'where' must be one of {', '.join(WHERE)}, got {request.where!r}.")
        if request.where == "roi":
            roi = self._node(request.roi, "ROI", "Place a markups ROI box around the defect, or explain the whole "
                                                 "volume.")
            box = bridge.ijk_box_from_roi(roi, volume_node)
            return {"type": "box", "lo": list(box.lo), "hi": list(box.hi)}
        if request.where == "point":
            points = self._node(request.point, "point", "Click a point on the defect (markups point list), or "
                                                       "explain the whole volume.")
            count = points.GetNumberOfControlPoints()
            if count == 0:
                raise RegionError(f"Point list {points.GetName()!r} has no points. Click on the defect first.")
            position = [0.0, 0.0, 0.0]
            points.GetNthControlPointPositionWorld(count - 1, position)
            ijk = bridge.ijk_from_ras(volume_node, position)
            return {"type": "component" if request.component else "voxel", "ijk": list(ijk)}
        return {"type": "whole"}

    def start(self, request: ExplainRequest) -> str:
        """Check the request against the scene and send it to the worker; returns the job id at once."""
        volume_node = self._node(request.input_volume, "input volume", "Pick the CT volume to explain.")
        if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"{volume_node.GetName()!r} is a label map, not a CT volume. Pick the CT volume to "
                             "explain.")
        if not request.model:
            raise InputError("No model is selected. Pick a model card (.json) or a TorchScript file.")
        region = self._region(request, volume_node)
        volume = bridge.volume_from_node(volume_node)
        input_path = self.client.exchange / f"input-{time.monotonic_ns()}.npy"
        payload = {"model": str(Path(request.model).resolve()), "method": request.method,
                   "volume": volume_message(volume, input_path),
                   "target": {"class": request.target_class or None, "contrast": request.contrast_class or None,
                              "score": request.score, "region": region},
                   "layer": request.layer or None, "settings": request.settings, "device": request.device,
                   "precision": request.precision, "seed": request.seed, "checks": list(request.checks),
                   "overlap": request.overlap, "blend": request.blend, "audit_log": request.audit_log,
                   "out_dir": str(self.client.exchange)}
        try:
            job = self.client.submit("explain", **payload)
        except Exception:
            input_path.unlink(missing_ok=True)
            raise
        self._jobs[job] = request
        self._inputs[job] = input_path
        return job

    def cancel(self, job: str | None = None, grace_s: float = 10.0) -> None:
        """Cancel one run (or every run in flight): cooperative first, the worker is killed after ``grace_s``."""
        for each in [job] if job else list(self._jobs):
            self.client.cancel(each, grace_s)

    def poll(self) -> list[SessionEvent]:
        """Non-blocking: progress and outcomes since the last call; finished runs are added to the scene here."""
        events, self._undelivered = self._undelivered, []
        for message in self.client.poll():
            job = str(message.get("id"))
            if job not in self._jobs:
                continue
            kind = message["type"]
            if kind == "progress":
                events.append(SessionEvent("progress", job, message["fraction"], message["message"],
                                           message.get("eta_s")))
                continue
            request = self._forget(job)
            if kind == "result":
                try:
                    run = self._add_results(request, message["result"])
                    events.append(SessionEvent("result", job, 1.0, "done", 0.0, run=run))
                except Exception as exc:  # noqa: BLE001 - reported to the user; the bridge left the scene clean
                    events.append(SessionEvent("error", job, message=str(exc), error_type=type(exc).__name__))
                finally:
                    self._clean(message["result"])
            elif kind == "cancelled":
                events.append(SessionEvent("cancelled", job, message="Cancelled; the scene is unchanged."))
            else:
                events.append(SessionEvent("error", job, message=message.get("message", ""),
                                           error_type=message.get("error")))
        return events

    def _forget(self, job: str) -> ExplainRequest:
        """Release a run's bookkeeping (the session is no longer busy with it) and its input file."""
        self._inputs.pop(job).unlink(missing_ok=True)
        return self._jobs.pop(job)

    def _add_results(self, request: ExplainRequest, result: dict):
        attribution = volume_from_message(result["attribution"])
        confidence = volume_from_message(result["confidence"]) if result.get("confidence") else None
        return bridge.add_run(self.scene, self.scene.GetNodeByID(request.input_volume), attribution,
                              {**result["explanation"], "request": asdict(request), "record": result["record"]},
                              confidence,
                              opacity=request.opacity, top_percent=request.top_percent, colormap=request.colormap,
                              render_3d=request.render_3d, volume_rendering_logic=self.volume_rendering_logic)

    @staticmethod
    def _clean(result: dict) -> None:
        for key in ("attribution", "confidence"):
            if result.get(key):
                Path(result[key]["path"]).unlink(missing_ok=True)

    def explain(self, request: ExplainRequest, progress: Callable[[SessionEvent], None] | None = None,
                cancel: Any = None, idle: Callable[[], None] | None = None) -> bridge.RunNodes:
        """Blocking Explain: returns the run's nodes; raises the worker's error or :class:`Cancelled`.

        ``idle`` runs between polls (Slicer passes ``slicer.app.processEvents`` to keep its GUI alive).
        """
        job = self.start(request)
        cancelled = False
        try:
            while True:
                for event in self.poll():
                    if event.job != job:
                        continue
                    if event.kind == "progress" and progress is not None:
                        progress(event)
                    elif event.kind == "result":
                        return event.run
                    elif event.kind == "cancelled":
                        raise Cancelled(event.message)
                    elif event.kind == "error":
                        raise WorkerError(event.error_type or "Error", event.message)
                if not cancelled and cancel is not None and cancel.is_set():
                    self.cancel(job)
                    cancelled = True
                if idle is not None:
                    idle()
                time.sleep(0.02)
        finally:
            # A callback or ``idle`` raised: nobody waits for this run any more, so it must not keep the session
            # busy; the worker stops it at its next batch and its late reply is ignored.
            if job in self._jobs:
                self.client.cancel(job)
                self._forget(job)

    def shutdown(self) -> None:
        """Stop the worker and remove its private exchange folder. Runs still in flight end with a
        ``WorkerStopped`` error: a blocking :meth:`explain` raises it, the next :meth:`poll` reports it."""
        self.client.stop()
        # Reported here rather than by polling the client: a blocking describe_model() on another thread (the
        # panel's model loader) must get its own "worker stopped" reply.
        for job in list(self._jobs):
            self._forget(job)
            self._undelivered.append(SessionEvent("error", job, message="The CTXAI worker was stopped before this "
                                                  "run finished (scene closed or module reloaded); the scene is "
                                                  "unchanged.", error_type="WorkerStopped"))
