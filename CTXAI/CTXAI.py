"""CTXAI: explains what a 3-D deep-learning model saw in an industrial CT volume (the Slicer module).

This file wires the panel to the Qt-free code in ``CTXAILib``: :class:`CTXAILib.session.ExplainSession` sends runs
to a persistent worker process (PythonSlicer, torch on the GPU) and builds the result nodes through the scene bridge
(:mod:`CTXAILib.scene`). The panel's helpers (connectors, texts, dependency installation, reload) are in
``CTXAIGuiLib`` beside this file. The Slicer process itself never imports torch, and imports ``CTXAILib`` only lazily.
"""

import enum
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CTXAIGuiLib.connectors import (
    ItemDataComboBoxConnector,
    MethodSettingsFormConnector,
    RunComboBoxConnector,
    parseMethodSettings,
)
from CTXAIGuiLib.dependencies import ensureRequirements, missingRequirements, pythonSlicerExecutable
from CTXAIGuiLib.reloading import reloadPackages
from CTXAIGuiLib.text import describeError, formatDuration, methodGroups, modelCardHtml

DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:2", "cuda:3")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_METHOD = "gradcam"
# explain() display keywords -> ExplainRequest fields
DISPLAY_OPTIONS = {"opacity": "opacity", "topPercent": "top_percent", "colormap": "colormap", "render3d": "render_3d"}


#
# CTXAI
#


class CTXAI(ScriptedLoadableModule):
    """The module's entry in Slicer's module list; the work is done by :class:`CTXAILogic`.

    >>> slicer.util.selectModule("CTXAI")
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CTXAI")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["CTXAI engineering"]
        self.parent.helpText = _("""
Explains what a 3-D deep-learning model saw when it flagged a defect in an industrial CT volume.
Pick the CT volume, a model (card .json or TorchScript), the class to explain and, for segmentation models, where
(a markups ROI box, a clicked point on a predicted defect, or the whole volume); pick a method and press Explain.
Each run adds one subject-hierarchy folder: a colour-mapped attribution overlay and 3-D rendering, a label map of the
most relevant voxels, the segmentation model's own confidence map, and a summary table.
The same calls are available from the Python console: <code>slicer.util.getModuleLogic("CTXAI").explain(...)</code>.
See <a href="https://github.com/ctxai/SlicerCTXAI">the CTXAI documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Developed by CTXAI engineering. Attribution methods build on Captum (PyTorch); PyTorch is installed through the
PyTorch extension for 3D Slicer. The bundled demonstration models were trained on synthetic industrial-CT phantoms.
""")


#
# Parameter node
#


class Where(enum.Enum):
    """Which region a segmentation target covers (a classifier's patch is placed by the ROI or point)."""

    Whole = "whole"
    ROI = "roi"
    Point = "point"

    def label(self):
        return {"whole": _("Whole volume"), "roi": _("ROI box"), "point": _("Clicked point")}[self.value]


class Score(enum.Enum):
    """Which class score is explained."""

    Logit = "logit"
    Probability = "probability"

    def label(self):
        return {"logit": _("Logit (raw score)"), "probability": _("Probability")}[self.value]


class Colormap(enum.Enum):
    """Colour map of the attribution overlay."""

    Auto = "auto"
    Heat = "heat"
    Diverging = "diverging"

    def label(self):
        return {"auto": _("Automatic (by method)"), "heat": _("Heat (positive evidence)"),
                "diverging": _("Diverging (for and against)")}[self.value]


def bundledModelPath(name: str) -> Path:
    """Card of a model shipped with the module (``unet`` or ``classifier``), whether or not it exists yet."""
    from CTXAILib.evaluation import bundled_models_dir

    return bundled_models_dir() / f"{name}.json"


@parameterNodeWrapper
class CTXAIParameterNode:
    """The panel's state, saved with the scene.

    >>> parameterNode = slicer.util.getModuleLogic("CTXAI").getParameterNode()
    >>> parameterNode.method = "integrated_gradients"
    """

    inputVolume: Optional[vtkMRMLScalarVolumeNode]
    modelPath: Annotated[Path, Default(generator=lambda: bundledModelPath("unet"))]
    targetClass: str = ""                  # "" = the predicted class (classifier) / first foreground class
    contrastClass: str = ""                # "" = no contrast
    score: Score = Score.Logit
    where: Where = Where.Whole
    roi: Optional[vtkMRMLMarkupsROINode]
    point: Optional[vtkMRMLMarkupsFiducialNode]
    component: bool = True
    method: str = DEFAULT_METHOD
    layer: str = ""                        # "" = the model's default CAM layer
    methodSettings: str = "{}"             # JSON {method: {setting: value}}
    device: Annotated[str, Choice(DEVICES)] = "auto"
    precision: Annotated[str, Choice(PRECISIONS)] = "fp32"
    seed: Annotated[int, WithinRange(0, 999999)] = 0
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    colormap: Colormap = Colormap.Auto
    topPercent: Annotated[float, WithinRange(0.1, 100.0)] = 5.0
    render3d: bool = True
    resultTable: Optional[vtkMRMLTableNode]  # the selected run, by its summary table


#
# Widget
#


# Parameters bound in code because no stock connector fits them: comboboxes filled at run time from the worker's
# answers (model card, layers, method registry), the settings form built from the registry, and the list of runs.
# Every other parameter is bound through a SlicerParameterName property in Resources/UI/CTXAI.ui.
MANUAL_BINDINGS = {
    "targetClass": ("targetClassComboBox", ItemDataComboBoxConnector),
    "contrastClass": ("contrastClassComboBox", ItemDataComboBoxConnector),
    "method": ("methodComboBox", ItemDataComboBoxConnector),
    "layer": ("layerComboBox", ItemDataComboBoxConnector),
    "methodSettings": ("methodSettingsFrame", MethodSettingsFormConnector),
    "resultTable": ("resultsComboBox", RunComboBoxConnector),
}


class CTXAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The CTXAI panel: state in :class:`CTXAIParameterNode`, work in :class:`CTXAILogic`.

    Explain runs in the worker process; a 100 ms timer polls it, so the GUI stays responsive and all MRML changes
    happen on the main thread. Model cards and the method list also come from the worker, read in a background
    thread while the timer waits for them.

    >>> widget = slicer.util.getModuleWidget("CTXAI")
    >>> widget.ui.explainButton.click()        # Explain; while it runs the same button cancels
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._connectors = {}
        self._methods = []              # the registry, as the worker lists it
        self._description = None        # the described model (card, layers), as the worker read it
        self._describedPath = None
        self._requestedPath = None      # model path of the last load attempt
        self._loader = None             # (thread, result dict, model path) while the worker is asked
        self._explainAfterLoading = False
        self._job = None
        self._jobStarted = 0.0
        self._runs = {}                 # table node ID -> RunNodes
        self._shownRun = None
        self._formMethod = None
        self._inParameterUpdate = False

    # ------------------------------------------------------------------------------------------- set-up
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self._panel = slicer.util.loadUI(self.resourcePath("UI/CTXAI.ui"))
        self.layout.addWidget(self._panel)
        self.ui = slicer.util.childWidgetVariables(self._panel)
        self._panel.setMRMLScene(slicer.mrmlScene)
        self.logic = CTXAILogic()

        self.ui.progressBar.hide()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.timeout.connect(self._onPollTimer)
        self._loadTimer = qt.QTimer()  # waits for typing in the model path to pause
        self._loadTimer.setSingleShot(True)
        self._loadTimer.setInterval(500)
        self._loadTimer.timeout.connect(self._onLoadTimer)
        self._resultsTimer = qt.QTimer()  # one refresh of the run list per burst of node additions/removals
        self._resultsTimer.setSingleShot(True)
        self._resultsTimer.setInterval(0)
        self._resultsTimer.timeout.connect(self._refreshResults)

        self._bundledModelsMenu = qt.QMenu(self.ui.bundledModelsButton)
        for name, text in (("unet", _("3-D U-Net: porosity and inclusion segmentation")),
                           ("classifier", _("3-D CNN: defect classifier of ROI patches"))):
            action = self._bundledModelsMenu.addAction(text)
            action.connect("triggered()", lambda name=name: self._useBundledModel(name))
        self.ui.bundledModelsButton.setMenu(self._bundledModelsMenu)

        self._connectors = {name: connector(getattr(self.ui, widgetName))
                            for name, (widgetName, connector) in MANUAL_BINDINGS.items()}

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._onNodeAddedOrRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self._onNodeAddedOrRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self._onNodeAddedOrRemoved)

        self.ui.explainButton.connect("clicked(bool)", self.onExplainButton)
        self.ui.placeRoiButton.connect("clicked(bool)", lambda checked: self._runWithErrorDisplay(
            _("Could not start placing an ROI box."), lambda: self._placeMarkup(Where.ROI)))
        self.ui.placePointButton.connect("clicked(bool)", lambda checked: self._runWithErrorDisplay(
            _("Could not start placing a point."), lambda: self._placeMarkup(Where.Point)))

        self.initializeParameterNode()

    def cleanup(self):
        self._pollTimer.stop()
        self._resultsTimer.stop()
        self._abandonWork()
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self._refreshResults()
        if self._needsLoading():
            self._loadTimer.start()

    def onReload(self):
        if self.logic is not None:
            self._abandonWork()
        reloadPackages("CTXAILib", "CTXAIGuiLib")
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self._abandonWork()
        self._runs = {}
        self._shownRun = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self._refreshResults()

    @property
    def busy(self) -> bool:
        """Whether the panel waits for the worker (reading a model card or running an explanation)."""
        return self._job is not None or self._loader is not None or self._loadTimer.isActive()

    # ---------------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if self._parameterNode.inputVolume is None:
            volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if node.GetAttribute("CTXAI.role") is None]
            if volumes:
                self._parameterNode.inputVolume = volumes[0]

    def setParameterNode(self, parameterNode):
        if (parameterNode is not None and self._parameterNode is not None
                and parameterNode.parameterNode is self._parameterNode.parameterNode):
            return  # connected once per node: repeated connections leave stale observers before Slicer 5.12
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            # connectParametersToGui returns the tag on every Slicer version (connectGui does not on 5.8).
            mapping = {w.property("SlicerParameterName"): w for w in self._panel.findChildren(qt.QWidget)
                       if w.property("SlicerParameterName")}
            mapping.update(self._connectors)
            self._parameterNodeGuiTag = parameterNode.connectParametersToGui(mapping)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        if self._inParameterUpdate or self._parameterNode is None:
            return  # a change made below: this pass already works with the final values
        self._inParameterUpdate = True
        try:
            if self._needsLoading() and self.parent.isEntered:
                self._loadTimer.start()
            if self._parameterNode.method != self._formMethod:
                self._rebuildSettingsForm()
            self._syncSelectedRun()
            self._updateGuiState()
        finally:
            self._inParameterUpdate = False

    def _updateGuiState(self):
        parameterNode = self._parameterNode
        if parameterNode is None:
            return
        task = self._task()
        where = parameterNode.where
        for widget in (self.ui.roiLabel, self.ui.roiWidget):
            widget.setVisible(where == Where.ROI)
        for widget in (self.ui.pointLabel, self.ui.pointWidget):
            widget.setVisible(where == Where.Point)
        self.ui.componentCheckBox.setVisible(where == Where.Point and task != "classification")
        self.ui.confidenceNoteLabel.setVisible(task != "classification")
        spec = self._methodSpec(parameterNode.method)
        needsLayer = bool(spec and spec.get("needs_layer"))
        self.ui.layerLabel.enabled = needsLayer
        self.ui.layerComboBox.enabled = needsLayer
        self.ui.methodSummaryLabel.text = spec.get("summary", "") if spec else ""
        running = self._job is not None
        self.ui.explainButton.text = _("Cancel") if running else _("Explain")
        if running:
            self.ui.explainButton.toolTip = _("Cancel the run: nothing is added to the scene.")
        elif parameterNode.inputVolume is None:
            self.ui.explainButton.toolTip = _("Select an input volume first.")
        elif self._loader is not None:
            self.ui.explainButton.toolTip = _("Waiting for the CTXAI worker to read the model.")
        else:
            self.ui.explainButton.toolTip = _("Compute the explanation in the background.")
        self.ui.explainButton.enabled = running or (self._loader is None and parameterNode.inputVolume is not None)

    # ---------------------------------------------------------------------- model card and method list
    def _task(self):
        return self._description["card"].get("task") if self._description else None

    def _methodSpec(self, name):
        return next((m for m in self._methods if m["name"] == name), None)

    def _needsLoading(self) -> bool:
        return self._parameterNode is not None and str(self._parameterNode.modelPath) != self._requestedPath

    def _onLoadTimer(self):
        try:
            self._startLoading()
        except Exception as exc:  # nobody asked for this load: report it in the status line only
            self._setStatus(f"{_('Could not read the model.')} {describeError(exc)}", error=True)

    def _startLoading(self):
        """Ask the worker (in a thread) for the method list and the model's card and layers."""
        from CTXAILib.errors import InputError

        parameterNode = self._parameterNode
        if parameterNode is None or self._loader is not None or self._job is not None:
            return  # asked again when the current work ends
        path = str(parameterNode.modelPath)
        self._requestedPath = path
        if not Path(path).is_file():
            self._description = None
            self._showModelCard()
            raise InputError(_("Model file {path} does not exist. Pick a model card (.json) or a TorchScript file.")
                             .format(path=path))
        missing = self.logic.missingDependencies()
        if missing:
            self._setStatus(_("CTXAI needs {packages}; they are installed when you press Explain.").format(
                packages=", ".join(missing)))
            return
        self.logic.session  # created here: it touches MRML and Slicer modules, which only the main thread may
        device = parameterNode.device
        result = {}

        def load():
            try:
                result["methods"] = self.logic.methods()
                result["description"] = self.logic.describeModel(path, device)
            except Exception as exc:  # handed to the main thread, which reports it
                result["error"] = exc

        thread = threading.Thread(target=load, name="CTXAI model reader", daemon=True)
        self._loader = (thread, result, path)
        self._setStatus(_("Starting the CTXAI worker and reading the model card..."))
        thread.start()
        self._pollTimer.start()
        self._updateGuiState()

    def _finishLoading(self):
        thread, result, path = self._loader
        self._loader = None
        explain = self._explainAfterLoading
        self._explainAfterLoading = False
        self._methods = result.get("methods", self._methods)
        self._description = result.get("description")
        self._describedPath = path
        if self._description is not None:
            self._populatePanel()
        else:  # keep the class and layer choices: they may fit again once the model loads
            with slicer.util.NodeModify(self._parameterNode):
                self._populateMethods()
            self._showModelCard()
            self._rebuildSettingsForm()
        if "error" in result:
            message = _("Could not read the model.")
            if explain:
                self._reportError(message, result["error"])
            else:
                self._setStatus(f"{message} {describeError(result['error'])}", error=True)
            return
        card = self._description["card"]
        self._setStatus(_("Model {name} is ready ({task}).").format(name=card.get("name", ""), task=card.get("task")))
        if self._needsLoading():
            self._loadTimer.start()
        elif explain:
            self.onExplainButton()

    def _populatePanel(self):
        """Fill the method, class and layer choices from the described model."""
        with slicer.util.NodeModify(self._parameterNode):
            self._populateMethods()
            card = self._description["card"]
            classes = [(name, name) for name in card.get("class_names", [])]
            classifier = card.get("task") == "classification"
            automatic = _("(predicted class)") if classifier else _("(first foreground class)")
            self._fillComboBox("targetClass", [(automatic, "")] + classes, "")
            self._fillComboBox("contrastClass", [(_("(none)"), "")] + classes, "")
            layers = [layer for layer in self._description.get("layers", []) if layer.get("cam_usable")]
            default = self._description.get("default_layer") or ""
            self._fillComboBox("layer", [(f"{layer['name']}  ({layer['type']}, {layer.get('output_shape')})",
                                          layer["name"]) for layer in layers], default)
        self._showModelCard()
        self._rebuildSettingsForm()
        self._updateGuiState()

    def _populateMethods(self):
        task = self._task()
        shown = [m for m in self._methods if not (m.get("segmentation_only") and task == "classification")]
        self._connectors["method"].setGroups(methodGroups(shown))
        names = [m["name"] for m in shown]
        if names and self._parameterNode.method not in names:
            self._parameterNode.method = DEFAULT_METHOD if DEFAULT_METHOD in names else names[0]
        self._connectors["method"].write(self._parameterNode.method)

    def _fillComboBox(self, parameterName, items, fallback):
        """Replace the items [(text, value)] of a runtime-filled combobox and keep its parameter valid."""
        self._connectors[parameterName].setItems(items)
        values = [value for _text, value in items]
        if values and getattr(self._parameterNode, parameterName) not in values:
            setattr(self._parameterNode, parameterName, fallback if fallback in values else values[0])
        self._connectors[parameterName].write(getattr(self._parameterNode, parameterName))

    def _showModelCard(self):
        self.ui.modelCardLabel.text = modelCardHtml(self._description)

    def _rebuildSettingsForm(self):
        method = self._parameterNode.method
        spec = self._methodSpec(method)
        self._connectors["methodSettings"].build(method if spec else "", spec["settings"] if spec else [],
                                                 self._parameterNode.methodSettings)
        self._formMethod = method

    def _useBundledModel(self, name):
        self._runWithErrorDisplay(_("The bundled model is missing."),
                                  lambda: setattr(self._parameterNode, "modelPath", self.logic.bundledModel(name)))

    def _placeMarkup(self, where):
        """Select (or create) the ROI or point list and start placing it in the views."""
        parameterNode = self._parameterNode
        if where == Where.ROI:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode",
                                                      slicer.mrmlScene.GenerateUniqueName("CTXAI ROI"))
            node.CreateDefaultDisplayNodes()
            parameterNode.roi = node
        else:
            node = parameterNode.point
            if node is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                          slicer.mrmlScene.GenerateUniqueName("CTXAI point"))
                node.CreateDefaultDisplayNodes()
                parameterNode.point = node
        parameterNode.where = where
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(node)
        markupsLogic.StartPlaceMode(False)

    # ------------------------------------------------------------------------------------------- runs
    def onExplainButton(self):
        if self._job is not None:
            self.logic.cancel(self._job)
            self._setStatus(_("Cancelling: the worker stops at its next batch, or is stopped within 10 s."))
            self.ui.explainButton.enabled = False
            return
        self._runWithErrorDisplay(_("Could not start the explanation."), self._startExplain)

    def _startExplain(self):
        self.logic.ensureDependencies()
        parameterNode = self._parameterNode
        if (not self._methods or self._description is None
                or self._describedPath != str(parameterNode.modelPath)):
            self._loadTimer.stop()
            self._startLoading()
            self._explainAfterLoading = self._loader is not None
            return
        arguments = self.logic.explainArguments(parameterNode)
        self._job = self.logic.explain(**arguments, blocking=False)
        self._jobStarted = time.monotonic()
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = "%p%"
        self.ui.progressBar.show()
        self._setStatus(_("Explaining with {method}...").format(method=parameterNode.method))
        self._pollTimer.start()
        self._updateGuiState()

    def _onPollTimer(self):
        try:
            if self._loader is not None and not self._loader[0].is_alive():
                self._finishLoading()
            if self._job is not None:
                for event in self.logic.poll():
                    self._onSessionEvent(event)
        except Exception as exc:  # a timer callback must not fail silently in the console, every 100 ms
            logging.exception("CTXAI: failure while following the worker")
            self._finishJob()
            self._reportError(_("CTXAI lost track of the run."), exc)
        if self._loader is None and self._job is None:
            self._pollTimer.stop()

    def _onSessionEvent(self, event):
        if event.job != self._job:
            return
        if event.kind == "progress":
            fraction = min(max(event.fraction, 0.0), 1.0)
            self.ui.progressBar.value = int(round(1000 * fraction))
            eta = "" if event.eta_s is None else _("about {time} left").format(time=formatDuration(event.eta_s))
            self.ui.progressBar.format = f"%p%  {eta}".strip()
            self._setStatus(event.message)
        elif event.kind == "result":
            elapsed = time.monotonic() - self._jobStarted
            self._finishJob()
            self._refreshResults()
            self._parameterNode.resultTable = slicer.mrmlScene.GetNodeByID(event.run.table)
            self._setStatus(_("Done in {time}: {name}.").format(time=formatDuration(elapsed),
                                                                name=self.logic.runName(event.run)))
        elif event.kind == "cancelled":
            self._finishJob()
            self._setStatus(_("Cancelled: the scene is unchanged."))
        else:
            from CTXAILib.client import WorkerError

            self._finishJob()
            self._reportError(_("The explanation failed."), WorkerError(event.error_type or "Error", event.message))

    def _finishJob(self):
        self._job = None
        self.ui.progressBar.hide()
        self._updateGuiState()
        if self._needsLoading():
            self._loadTimer.start()

    def _abandonWork(self):
        """Forget the panel's work and stop the worker (scene close, reload, module cleanup)."""
        self._loadTimer.stop()
        self._explainAfterLoading = False
        self._job = None
        self.logic.shutdown()
        if self._loader is not None:
            # Stopping the worker fails the reader thread's request on the thread's next poll (within 20 ms). Wait
            # for that: until it returns, the logic counts its call as busy, and its polls would take the replies
            # of the worker that the next request starts.
            self._loader[0].join(1.0)
            self._loader = None
        self.ui.progressBar.hide()
        self._updateGuiState()

    # ----------------------------------------------------------------------------------------- results
    def _onNodeAddedOrRemoved(self, caller, event):
        if not slicer.mrmlScene.IsClosing() and not slicer.mrmlScene.IsImporting():
            self._resultsTimer.start()

    def _refreshResults(self):
        """List the runs of the scene; runs whose nodes vanished are forgotten."""
        if self._parameterNode is None or slicer.mrmlScene.IsClosing():
            return
        runs = [run for run in self.logic.runs()
                if slicer.mrmlScene.GetNodeByID(run.table) and slicer.mrmlScene.GetNodeByID(run.attribution)]
        self._runs = {run.table: self._runs.get(run.table, run) for run in runs}  # keep objects: they hold state
        self._connectors["resultTable"].setItems([(self.logic.runName(run), table)
                                                  for table, run in self._runs.items()])
        self._connectors["resultTable"].write(self._parameterNode.resultTable)
        self._syncSelectedRun()

    def _syncSelectedRun(self):
        """Show the selected run; afterwards, apply output-option changes to it without recomputing."""
        parameterNode = self._parameterNode
        table = parameterNode.resultTable
        run = self._runs.get(table.GetID()) if table is not None else None
        if run is not self._shownRun:
            self._shownRun = run
            self.ui.resultTableView.setMRMLTableNode(table if run is not None else None)
            if run is None:
                return
            self.logic.showRun(run)
            with slicer.util.NodeModify(parameterNode):
                parameterNode.opacity = run.opacity
                parameterNode.topPercent = run.top_percent
                parameterNode.render3d = self.logic.isRendered3d(run)
                if run.colormap in {c.value for c in Colormap}:  # not a colour node ID given in the console
                    parameterNode.colormap = Colormap(run.colormap)
            return
        if run is not None:
            self._runWithErrorDisplay(_("Could not update the selected run."), lambda: self._applyOutputOptions(run))

    def _applyOutputOptions(self, run):
        parameterNode = self._parameterNode
        if not math.isclose(run.opacity, parameterNode.opacity):
            self.logic.setOpacity(run, parameterNode.opacity)
        if not math.isclose(run.top_percent, parameterNode.topPercent):
            self.logic.setTopPercent(run, parameterNode.topPercent)
        if parameterNode.render3d != self.logic.isRendered3d(run):
            self.logic.setRender3d(run, parameterNode.render3d)
        if parameterNode.colormap.value != run.colormap:
            self.logic.setColormap(run, parameterNode.colormap.value)

    # ------------------------------------------------------------------------------------------ status
    def _setStatus(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")
        if error:
            logging.error(f"CTXAI: {text}")

    def _reportError(self, message, exc):
        text = f"{message} {describeError(exc)}"
        self._setStatus(text, error=True)
        slicer.util.errorDisplay(text, windowTitle=_("CTXAI"))

    def _runWithErrorDisplay(self, message, function):
        """Run ``function``; an error goes to a dialog (tryWithErrorDisplay) and to the status line."""
        try:
            with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
                function()
        except Exception as exc:  # already shown in the dialog; keep it visible in the panel too
            self._setStatus(f"{message} {describeError(exc)}", error=True)


#
# Logic
#


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

    def getParameterNode(self):
        return CTXAIParameterNode(super().getParameterNode())

    @property
    def session(self):
        """The :class:`CTXAILib.session.ExplainSession` on Slicer's scene (its worker starts on first use)."""
        if self._session is None:
            from CTXAILib.client import WorkerClient
            from CTXAILib.session import ExplainSession

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
        """Install what the worker needs, asking first: torch through the PyTorch extension, then the pip
        requirements. Slicer's numpy, SimpleITK and vtk (and the installed torch) are pinned while pip runs."""
        ensureRequirements(self._requirementsFile())

    def _requirementsFile(self) -> Path:
        return Path(slicer.util.modulePath(self.moduleName)).parent / "Resources" / "requirements.txt"

    # ---------------------------------------------------------------------------------- model, methods
    def bundledModel(self, name: str = "unet") -> Path:
        """Card of a shipped model: ``unet`` (porosity segmentation) or ``classifier`` (defect classes)."""
        from CTXAILib.evaluation import bundled_model

        return bundled_model(name)

    def methods(self) -> list:
        """The attribution methods, from the worker's registry: name, label, family, summary, signed,
        needs_layer, segmentation_only and settings ({name, type, default, min, max, choices, help})."""
        return self._callWorker(lambda: self.session.methods())

    def methodSpec(self, name: str):
        return next((m for m in self.methods() if m["name"] == name), None)

    def describeModel(self, modelPath, device: str = "auto") -> dict:
        """A model's card, its layers (``cam_usable`` for CAM methods) and default CAM layer, read by the worker."""
        from CTXAILib.errors import InputError

        if not Path(modelPath).is_file():
            raise InputError(_("Model file {path} does not exist. Pick a model card (.json) or a TorchScript file.")
                             .format(path=modelPath))
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
                "precision": p.precision, "seed": p.seed, "opacity": p.opacity, "topPercent": p.topPercent,
                "colormap": p.colormap.value, "render3d": p.render3d}

    def explain(self, inputVolume, modelPath=None, method="gradcam", targetClass=None, roi=None, point=None,
                layer=None, settings=None, device="auto", blocking=True, progressCallback=None, *,
                contrastClass=None, score="logit", component=True, precision="fp32", seed=0, **display):
        """Explain ``targetClass`` of a model on a volume node.

        :param inputVolume: the CT volume node; results get exactly its geometry.
        :param modelPath: model card (.json) or TorchScript file; default: the bundled U-Net.
        :param method: a registry name (see :meth:`methods`), e.g. ``gradcam``, ``integrated_gradients``.
        :param targetClass: class name from the card; None: the predicted class (classifier) or the first
            foreground class (segmentation). ``contrastClass`` explains "targetClass rather than contrastClass".
        :param roi: a markups ROI node: the region explained (segmentation) or the classifier's patch.
        :param point: a markups point list: its last point selects a predicted defect (``component=True``) or one
            voxel; for a classifier it centres the patch. Neither ROI nor point: the whole volume.
        :param layer: the CAM layer (default: the card's); ``settings``: method settings by name.
        :param device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``precision``: fp32, bf16 or fp16.
        :param blocking: wait for the result (the GUI stays alive) and return its
            :class:`CTXAILib.scene.RunNodes`; False: return the job id at once (follow it with :meth:`poll`).
        :param progressCallback: ``progressCallback(fraction, message, etaSeconds)`` while blocking.
        :param display: output options ``opacity`` (0-1), ``topPercent`` (label map, 0.1-100), ``colormap``
            (auto, heat, diverging), ``render3d`` (bool).
        :raises CTXAILib.errors.CTXAIError: what went wrong and how to fix it; a failed run adds no node.
        """
        from CTXAILib.errors import CTXAIError, InputError
        from CTXAILib.session import ExplainRequest

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
            precision=precision, seed=seed, **{DISPLAY_OPTIONS[name]: value for name, value in display.items()})
        if not blocking:
            return self.session.start(request)
        progress = None
        if progressCallback is not None:
            def progress(event):
                progressCallback(event.fraction, event.message, event.eta_s)
        return self.session.explain(request, progress=progress, idle=slicer.app.processEvents)

    def poll(self) -> list:
        """Progress and outcomes of non-blocking runs since the last call; finished runs are added to the scene."""
        return self.session.poll()

    def cancel(self, job=None):
        """Cancel a run (all runs if ``job`` is None): cooperative first, the worker is stopped after 10 s."""
        self.session.cancel(job)

    def runs(self) -> list:
        """Every run in the scene (:class:`CTXAILib.scene.RunNodes`), oldest first."""
        from CTXAILib import scene

        return scene.find_runs(slicer.mrmlScene)

    def runName(self, run) -> str:
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        return shNode.GetItemName(run.folder)

    def showRun(self, run):
        """Show a run in the Red, Green and Yellow views (input, attribution overlay, label map)."""
        from CTXAILib import scene

        scene.show_run(slicer.mrmlScene, run)

    def setOpacity(self, run, opacity: float):
        from CTXAILib import scene

        scene.set_opacity(slicer.mrmlScene, run, opacity)

    def setTopPercent(self, run, topPercent: float):
        """Relabel the top ``topPercent`` % most relevant voxels from the stored attribution (no recomputation)."""
        from CTXAILib import scene

        scene.set_top_percent(slicer.mrmlScene, run, topPercent)

    def setRender3d(self, run, visible: bool):
        from CTXAILib import scene

        scene.set_render_3d(slicer.mrmlScene, run, visible, self.volumeRenderingLogic)

    def isRendered3d(self, run) -> bool:
        node = slicer.mrmlScene.GetNodeByID(run.volume_rendering) if run.volume_rendering else None
        return bool(node is not None and node.GetVisibility())

    def setColormap(self, run, colormap: str):
        """Recolour a run (auto, heat, diverging) without recomputing it."""
        from CTXAILib import scene

        scene.set_colormap(slicer.mrmlScene, run, colormap)


#
# Test
#


class CTXAITest(ScriptedLoadableModuleTest):
    """End-to-end checks inside Slicer on a synthetic phantom with the bundled models: the console API, the panel
    (Explain and Cancel), and that a failed run adds nothing to the scene. Needs PyTorch and the requirements.

    >>> slicer.selfTests["CTXAI"]()
    """

    phantomCache = None

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ConsoleExplainsPhantom()
        self.setUp()
        self.test_PanelExplainsAndCancels()
        self.setUp()
        self.test_FailedRunAddsNothing()

    def _phantom(self):
        """A 96^3 phantom with known pores and inclusions (generated once), as a new volume node."""
        if CTXAITest.phantomCache is None:
            from CTXAILib.phantom import generate_phantom

            CTXAITest.phantomCache = generate_phantom(7, (96, 96, 96),
                                                      defect_counts={"pore": 3, "crack": 1, "inclusion_dense": 2})
        phantom = CTXAITest.phantomCache
        volume = slicer.util.addVolumeFromArray(phantom.ct.array, phantom.ct.ijk_to_ras, "CTXAI phantom")
        return volume, phantom

    @staticmethod
    def _ras(volume, ijk):
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        return matrix.MultiplyPoint([*ijk, 1.0])[:3]

    def _pointAt(self, volume, ijk):
        point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "CTXAI click")
        point.AddControlPoint(self._ras(volume, ijk))
        return point

    @staticmethod
    def _largest(phantom, types):
        return max((d for d in phantom.defects if d.type in types), key=lambda d: d.voxel_count)

    @staticmethod
    def _geometry(node):
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return [matrix.GetElement(r, c) for r in range(4) for c in range(4)], node.GetImageData().GetDimensions()

    def _checkRun(self, run, volume, colorName, hasConfidence):
        scene = slicer.mrmlScene
        attribution = scene.GetNodeByID(run.attribution)
        labels = scene.GetNodeByID(run.labels)
        table = scene.GetNodeByID(run.table)
        self.assertEqual(self._geometry(attribution), self._geometry(volume))
        self.assertEqual(self._geometry(labels), self._geometry(volume))
        self.assertTrue(labels.IsA("vtkMRMLLabelMapVolumeNode"))
        self.assertEqual(attribution.GetDisplayNode().GetColorNode().GetName(), colorName)
        self.assertEqual(run.confidence is not None, hasConfidence)
        self.assertGreater(table.GetNumberOfRows(), 3)
        self.assertTrue(scene.GetNodeByID(run.volume_rendering).GetVisibility())
        layoutManager = slicer.app.layoutManager()
        for view in ("Red", "Green", "Yellow"):
            composite = layoutManager.sliceWidget(view).sliceLogic().GetSliceCompositeNode()
            self.assertEqual(composite.GetBackgroundVolumeID(), volume.GetID())
            self.assertEqual(composite.GetForegroundVolumeID(), run.attribution)
            self.assertEqual(composite.GetLabelVolumeID(), run.labels)

    def _idleLogic(self):
        """The module's logic, once the panel no longer uses the worker (a console run would be refused)."""
        widget = slicer.util.getModuleWidget("CTXAI")
        self._waitUntil(lambda: not widget.busy, 300, "the panel to finish reading the model card")
        return widget.logic

    def _waitUntil(self, condition, timeoutS, what):
        deadline = time.monotonic() + timeoutS
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"Timed out after {timeoutS} s waiting for {what}.")
            slicer.app.processEvents()
            time.sleep(0.05)

    def test_ConsoleExplainsPhantom(self):
        self.delayDisplay("Console API: U-Net at a clicked pore, classifier on an ROI")
        volume, phantom = self._phantom()
        logic = self._idleLogic()

        pore = self._largest(phantom, ("pore",))
        run = logic.explain(volume, logic.bundledModel("unet"), "gradcam", targetClass="void",
                            point=self._pointAt(volume, pore.centre))
        self._checkRun(run, volume, "CTXAI heat", hasConfidence=True)
        attribution = slicer.util.arrayFromVolume(slicer.mrmlScene.GetNodeByID(run.attribution))
        near = tuple(slice(max(lo - 4, 0), hi + 4) for lo, hi in zip(reversed(pore.lo), reversed(pore.hi)))
        self.assertGreater(attribution[near].mean(), attribution.mean())

        inclusion = self._largest(phantom, ("inclusion_dense",))
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "CTXAI patch")
        roi.SetCenter(self._ras(volume, inclusion.centre))
        roi.SetSize(*[32 * s for s in volume.GetSpacing()])
        run = logic.explain(volume, logic.bundledModel("classifier"), "integrated_gradients",
                            targetClass="inclusion", roi=roi, settings={"steps": 8})
        self._checkRun(run, volume, "CTXAI diverging", hasConfidence=False)
        self.delayDisplay("Console API passed")

    def test_PanelExplainsAndCancels(self):
        self.delayDisplay("Panel: Explain, then Cancel")
        volume, phantom = self._phantom()
        point = self._pointAt(volume, self._largest(phantom, ("pore",)).centre)
        slicer.util.selectModule("CTXAI")
        widget = slicer.util.getModuleWidget("CTXAI")
        parameterNode = widget.logic.getParameterNode()
        with slicer.util.NodeModify(parameterNode):
            parameterNode.inputVolume = volume
            parameterNode.modelPath = widget.logic.bundledModel("unet")
            parameterNode.where = Where.Point
            parameterNode.point = point
            parameterNode.targetClass = "void"
            parameterNode.method = "gradcam"
        self._waitUntil(lambda: not widget.busy, 300, "the panel to read the model card")
        self.assertGreater(widget.ui.methodComboBox.count, 0)

        widget.ui.explainButton.click()
        self.assertTrue(widget.busy)
        self._waitUntil(lambda: not widget.busy, 600, "the explanation")
        table = parameterNode.resultTable
        self.assertIsNotNone(table, widget.ui.statusLabel.text)
        run = next(r for r in widget.logic.runs() if r.table == table.GetID())
        self._checkRun(run, volume, "CTXAI heat", hasConfidence=True)
        self.assertEqual(widget.ui.resultTableView.mrmlTableNode().GetID(), table.GetID())

        nodes = slicer.mrmlScene.GetNumberOfNodes()
        parameterNode.method = "occlusion"
        parameterNode.methodSettings = json.dumps({"occlusion": {"window": 4, "stride": 1}})  # far too slow to end
        widget.ui.explainButton.click()
        started = widget.ui.statusLabel.text
        self._waitUntil(lambda: widget.ui.statusLabel.text != started, 300, "the first progress report")
        self.assertTrue(widget.busy)
        widget.ui.explainButton.click()
        self._waitUntil(lambda: not widget.busy, 120, "the cancellation")
        self.assertEqual(widget.ui.statusLabel.text, _("Cancelled: the scene is unchanged."))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay("Panel passed")

    def test_FailedRunAddsNothing(self):
        self.delayDisplay("A failed run adds no node")
        from CTXAILib.errors import CTXAIError

        volume = self._phantom()[0]
        logic = self._idleLogic()
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(CTXAIError) as raised:
            logic.explain(volume, logic.bundledModel("unet"), "gradcam", targetClass="no-such-class")
        self.assertEqual(getattr(raised.exception, "kind", None), "TargetError")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay("Failed run passed")
