"""The CTXAI logic: explain CT volumes from nodes and values, through the worker process; the panel uses it too."""

from pathlib import Path

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from CTXAIGuiLib.connectors import parseMethodSettings
from CTXAIGuiLib.dependencies import ensureRequirements, missingRequirements, pythonSlicerExecutable
from CTXAIGuiLib.parameters import CTXAIParameterNode, Where

# explain() display keywords -> ExplainRequest fields
DISPLAY_OPTIONS = {"opacity": "opacity", "topPercent": "top_percent", "colormap": "colormap", "render3d": "render_3d"}


class CTXAILogic(ScriptedLoadableModuleLogic):
    """Explain CT volumes from the Python console; the panel makes the same calls.

    Nodes and values in, result nodes out. Runs go to a persistent worker process (PythonSlicer) that keeps the
    model warm on the GPU between runs; Slicer itself never imports torch. :meth:`explain` blocks by default and
    keeps the GUI alive; with ``blocking=False`` it returns a job id, and :meth:`poll` reports progress and adds
    the result nodes when the run ends.

    >>> logic = slicer.util.getModuleLogic("CTXAI")
    >>> ct = slicer.util.getNode("CT")
    >>> click = slicer.util.getNode("F")                       # a markups point list; its last point is used
    >>> run = logic.explain(ct, method="integrated_gradients", targetClass="void", point=click,
    ...                     settings={"steps": 16}, topPercent=2.0)
    >>> logic.setOpacity(run, 0.7)
    >>> logic.setTopPercent(run, 1.0)                           # new label map, no model evaluation
    >>> box = slicer.util.getNode("R")                          # a markups ROI: places the classifier's patch
    >>> logic.explain(ct, logic.bundledModel("classifier"), "gradcam", "inclusion", roi=box)
    >>> [logic.runName(r) for r in logic.runs()]
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._session = None
        self._workerCalls = 0
        # The worker must not outlive Slicer, also when the panel was never opened (console use only).
        slicer.app.connect("aboutToQuit()", self.shutdown)

    def getParameterNode(self):
        return CTXAIParameterNode(super().getParameterNode())

    @property
    def session(self):
        """The :class:`CTXAILib.scene.session.ExplainSession` on Slicer's scene (its worker starts on first use)."""
        if self._session is None:
            from CTXAILib.scene.session import ExplainSession
            from CTXAILib.worker.client import WorkerClient

            client = WorkerClient(command=[pythonSlicerExecutable(), "-m", "CTXAILib.worker"])
            self._session = ExplainSession(slicer.mrmlScene, client, self.volumeRenderingLogic)
        return self._session

    @property
    def volumeRenderingLogic(self):
        module = getattr(slicer.modules, "volumerendering", None)
        return module.logic() if module is not None else None

    @property
    def busy(self) -> bool:
        """Whether the worker is in use: a run in flight, or a model card or the method list being read."""
        return self._workerCalls > 0 or (self._session is not None and self._session.busy)

    def shutdown(self):
        """Stop the worker (it restarts on the next request)."""
        if self._session is not None:
            self._session.shutdown()

    # ---------------------------------------------------------------------------------- dependencies
    def missingDependencies(self) -> list:
        """What the worker needs and is not installed (torch included), checked without importing anything."""
        return missingRequirements(self._requirementsFile())

    def ensureDependencies(self):
        """Install what the worker needs, asking first: torch (in a PythonSlicer process), then the pip
        requirements. Slicer's numpy, SimpleITK and vtk (and the installed torch) are pinned while pip runs."""
        ensureRequirements(self._requirementsFile())

    def _requirementsFile(self) -> Path:
        return Path(slicer.util.modulePath(self.moduleName)).parent / "Resources" / "requirements.txt"

    # ---------------------------------------------------------------------------------- model, methods
    def bundledModel(self, name: str = "unet") -> Path:
        """Card of a shipped model: ``unet`` (porosity segmentation) or ``classifier`` (defect classes)."""
        from CTXAILib.synthetic.evaluation import bundled_model

        return bundled_model(name)

    def methods(self) -> list:
        """The attribution methods, from the worker's registry: name, label, family, summary, sign (attribution,
        sensitivity or magnitude), signed, needs_layer, segmentation_only and settings ({name, type, default, min,
        max, choices, help})."""
        return self._callWorker(lambda: self.session.methods())

    def methodSpec(self, name: str):
        return next((m for m in self.methods() if m["name"] == name), None)

    def describeModel(self, modelPath, device: str = "auto") -> dict:
        """A model's card, its layers (``cam_usable`` for CAM methods) and default CAM layer, read by the worker."""
        from CTXAILib.errors import InputError

        if not (Path(modelPath).is_file() or (Path(modelPath) / "plans.json").is_file()):
            raise InputError(_("Model file {path} does not exist. Pick a model card (.json), a TorchScript file or "
                               "an nnU-Net results folder.").format(path=modelPath))
        return self._callWorker(lambda: self.session.describe_model(str(modelPath), device))

    def _callWorker(self, request):
        from CTXAILib.errors import CTXAIError

        if self._session is not None and self._session.busy:
            raise CTXAIError(_("A CTXAI run is in progress: wait for it or cancel it first."))
        self._workerCalls += 1
        try:
            return request()
        finally:
            self._workerCalls -= 1

    # ------------------------------------------------------------------------------------------- runs
    def explainArguments(self, parameterNode) -> dict:
        """The :meth:`explain` arguments that a parameter node (the panel's state) describes."""
        from CTXAILib.errors import InputError

        p = parameterNode
        if p.where == Where.ROI and p.roi is None:
            raise InputError(_("'Where' is an ROI box, but no ROI is selected. Place one with the Place button."))
        if p.where == Where.Point and p.point is None:
            raise InputError(_("'Where' is a clicked point, but no point list is selected. Place a point on the "
                               "defect with the Place button."))
        spec = self.methodSpec(p.method)
        known = {s["name"] for s in spec["settings"]} if spec else None
        settings = {name: value for name, value in parseMethodSettings(p.methodSettings).get(p.method, {}).items()
                    if known is None or name in known}
        needsLayer = spec is None or spec.get("needs_layer")
        return {"inputVolume": p.inputVolume, "modelPath": p.modelPath, "method": p.method,
                "targetClass": p.targetClass or None, "contrastClass": p.contrastClass or None,
                "score": p.score.value, "roi": p.roi if p.where == Where.ROI else None,
                "point": p.point if p.where == Where.Point else None, "component": p.component,
                "layer": (p.layer or None) if needsLayer else None, "settings": settings, "device": p.device,
                "precision": p.precision, "overlap": p.overlap, "blend": p.blend, "seed": p.seed,
                "opacity": p.opacity, "topPercent": p.topPercent,
                "colormap": p.colormap.value, "render3d": p.render3d}

    def explain(self, inputVolume, modelPath=None, method="gradcam", targetClass=None, roi=None, point=None,
                layer=None, settings=None, device="auto", blocking=True, progressCallback=None, *,
                contrastClass=None, score="logit", component=True, precision="fp32", seed=0, checks=None, auditLog=None,
                overlap=None, blend=None, **display):
        """Explain ``targetClass`` of a model on a volume node.

        :param inputVolume: the CT volume node; results get exactly its geometry.
        :param modelPath: model card (.json), TorchScript file or nnU-Net results folder; default: the bundled U-Net.
        :param method: a registry name (see :meth:`methods`), e.g. ``gradcam``, ``integrated_gradients``.
        :param targetClass: class name from the card; None: the predicted class (classifier) or the first
            foreground class (segmentation). ``contrastClass`` explains "targetClass rather than contrastClass".
        :param roi: a markups ROI node: the region explained (segmentation) or the classifier's patch.
        :param point: a markups point list: its last point selects a predicted defect (``component=True``) or one
            voxel; for a classifier it centres the patch. Neither ROI nor point: the whole volume.
        :param layer: the CAM layer (default: the card's); ``settings``: method settings by name.
        :param device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``precision``: fp32, bf16 or fp16.
        :param overlap: fraction of the patch that neighbouring sliding-window tiles share, in [0, 1); ``blend``:
            ``gaussian`` or ``constant`` (a plain average); None: the model card's ``sliding_window``, else 0.25 and
            gaussian.
        :param blocking: wait for the result (the GUI stays alive) and return its
            :class:`CTXAILib.scene.bridge.RunNodes`; False: return the job id at once (follow it with :meth:`poll`).
        :param progressCallback: called while blocking with each progress event
            (:class:`CTXAILib.scene.session.SessionEvent`: ``fraction`` 0-1, ``message``, ``eta_s`` or None),
            e.g. ``progressCallback=lambda e: print(f"{e.fraction:.0%}")``.
        :param checks: the checks of the map (names of ``ctxai checks``, or ``["all"]``); None: the cheap default
            (spill, target sensitivity). The run's ``explanation["checks"]`` and ``["verdict"]`` hold the results.
        :param auditLog: the audit log file the run is appended to; None: ``$CTXAI_AUDIT_LOG``, else the per-user
            log (``~/.local/share/CTXAI/audit.jsonl`` on Linux; check it with ``ctxai audit verify``).
        :param display: output options ``opacity`` (0-1), ``topPercent`` (label map, 0.1-100), ``colormap``
            (auto, heat, diverging), ``render3d`` (bool).
        :raises CTXAILib.errors.CTXAIError: what went wrong and how to fix it; a failed run adds no node.
        """
        from CTXAILib.errors import CTXAIError, InputError
        from CTXAILib.scene.session import ExplainRequest

        unknown = sorted(set(display) - set(DISPLAY_OPTIONS))
        if unknown:
            raise TypeError(f"explain() got unknown display option(s) {', '.join(unknown)}; "
                            f"use {', '.join(DISPLAY_OPTIONS)}.")
        if inputVolume is None:
            raise InputError(_("No input volume is given. Pass the CT volume node to explain."))
        if roi is not None and point is not None:
            raise InputError(_("Give an ROI or a point, not both."))
        if self.busy:
            raise CTXAIError(_("A CTXAI run is in progress: wait for it or cancel it first."))
        self.ensureDependencies()
        request = ExplainRequest(
            input_volume=inputVolume.GetID(), model=str(modelPath or self.bundledModel("unet")), method=method,
            target_class=targetClass or None, contrast_class=contrastClass or None, score=score,
            where="roi" if roi is not None else "point" if point is not None else "whole",
            roi=roi.GetID() if roi is not None else None, point=point.GetID() if point is not None else None,
            component=component, layer=layer or None, settings=dict(settings or {}), device=device,
            precision=precision, overlap=overlap, blend=blend, seed=seed,
            **({} if checks is None else {"checks": tuple(checks)}), audit_log=str(auditLog) if auditLog else None,
            **{DISPLAY_OPTIONS[name]: value for name, value in display.items()})
        if not blocking:
            return self.session.start(request)
        return self.session.explain(request, progress=progressCallback, idle=slicer.app.processEvents)

    def poll(self) -> list:
        """Progress and outcomes of non-blocking runs since the last call; finished runs are added to the scene."""
        return self.session.poll()

    def cancel(self, job=None):
        """Cancel a run (all runs if ``job`` is None): cooperative first, the worker is stopped after 10 s."""
        self.session.cancel(job)

    def runs(self) -> list:
        """Every run in the scene (:class:`CTXAILib.scene.bridge.RunNodes`), oldest first."""
        from CTXAILib.scene import bridge

        return bridge.find_runs(slicer.mrmlScene)

    def runName(self, run) -> str:
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        return shNode.GetItemName(run.folder)

    def writeReport(self, run, path) -> Path:
        """Write a self-contained HTML report of a run (tri-planar and 3-D pictures, prediction, settings, checks,
        provenance) to ``path``; made in this process from the run's nodes, without torch.

        >>> logic.writeReport(logic.runs()[-1], "/tmp/pore-report.html")
        """
        from CTXAILib.records.html import write_record_page
        from CTXAILib.scene import bridge

        ct = bridge.volume_from_node(slicer.mrmlScene.GetNodeByID(run.input))
        attribution = bridge.volume_from_node(slicer.mrmlScene.GetNodeByID(run.attribution))
        record = run.explanation.get("record") or run.explanation
        return write_record_page(record, ct, attribution, path, name=self.runName(run))

    def showRun(self, run):
        """Show a run in the Red, Green and Yellow views (input, attribution overlay, label map)."""
        from CTXAILib.scene import bridge

        bridge.show_run(slicer.mrmlScene, run)

    def setOpacity(self, run, opacity: float):
        from CTXAILib.scene import bridge

        bridge.set_opacity(slicer.mrmlScene, run, opacity)

    def setTopPercent(self, run, topPercent: float):
        """Relabel the top ``topPercent`` % most relevant voxels from the stored attribution (no recomputation)."""
        from CTXAILib.scene import bridge

        bridge.set_top_percent(slicer.mrmlScene, run, topPercent)

    def setRender3d(self, run, visible: bool):
        from CTXAILib.scene import bridge

        bridge.set_render_3d(slicer.mrmlScene, run, visible, self.volumeRenderingLogic)

    def isRendered3d(self, run) -> bool:
        node = slicer.mrmlScene.GetNodeByID(run.volume_rendering) if run.volume_rendering else None
        return bool(node is not None and node.GetVisibility())

    def setColormap(self, run, colormap: str):
        """Recolour a run (auto, heat, diverging) without recomputing it."""
        from CTXAILib.scene import bridge

        bridge.set_colormap(slicer.mrmlScene, run, colormap)
