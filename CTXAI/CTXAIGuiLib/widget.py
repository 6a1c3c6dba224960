"""The CTXAI panel: binds the .ui to the parameter node and follows the worker's runs without blocking the GUI."""

import logging
import math
import threading
import time
from pathlib import Path

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from CTXAIGuiLib.connectors import ItemDataComboBoxConnector, MethodSettingsFormConnector, RunComboBoxConnector
from CTXAIGuiLib.logic import CTXAILogic
from CTXAIGuiLib.parameters import DEFAULT_METHOD, Colormap, Where
from CTXAIGuiLib.reloading import reloadPackages
from CTXAIGuiLib.text import describeError, formatDuration, methodGroups, modelCardHtml, verdictHtml

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
        self.ui.modelFolderButton.connect("clicked(bool)", lambda checked: self._pickModelFolder())

        self._connectors = {name: connector(getattr(self.ui, widgetName))
                            for name, (widgetName, connector) in MANUAL_BINDINGS.items()}

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._onNodeAddedOrRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self._onNodeAddedOrRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self._onNodeAddedOrRemoved)

        self.ui.explainButton.connect("clicked(bool)", self.onExplainButton)
        self.ui.reportButton.connect("clicked(bool)", self.onReportButton)
        self.ui.reportButton.enabled = False  # until a run is selected
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
        self.ui.reportButton.enabled = False

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
            # getNodesByClass also returns subclasses: label maps are not CT volumes.
            volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if node.GetAttribute("CTXAI.role") is None and not node.IsA("vtkMRMLLabelMapVolumeNode")]
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
        # ctkPathLineEdit's settingKey keeps only the paths added explicitly: remember the models that loaded.
        self.ui.modelPathLineEdit.addCurrentPathToHistory()
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
            # The model's own tiling, as its card states it; the analyst may change it for the next runs.
            window = card.get("sliding_window") or {}
            self._parameterNode.overlap = window.get("overlap", 0.25)
            self._parameterNode.blend = window.get("blend", "gaussian")
        self._showModelCard()
        self._rebuildSettingsForm()
        self._updateGuiState()

    def _populateMethods(self):
        task = self._task()
        hookable = (self._description or {}).get("layer_methods", True)
        shown = [m for m in self._methods if not (m.get("segmentation_only") and task == "classification")
                 and not (m.get("needs_hooks") and not hookable)]
        self._connectors["method"].setGroups(methodGroups(shown, (self._description or {}).get("advice")))
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

    def _pickModelFolder(self):
        """An nnU-Net results folder as the model: ctkPathLineEdit's own browse button opens files only."""
        start = str(self._parameterNode.modelPath) if self._parameterNode else ""
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("nnU-Net v2 results folder"), start)
        if folder:
            self._parameterNode.modelPath = Path(folder)

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
        # No wait cursor: installing the dependencies asks first, and a busy cursor over a question misleads.
        self._runWithErrorDisplay(_("Could not start the explanation."), self._startExplain, waitCursor=False)

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
            from CTXAILib.worker.client import WorkerError

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
            self.ui.verdictLabel.text = verdictHtml(run.explanation) if run is not None else ""
            self.ui.reportButton.enabled = run is not None
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

    def onReportButton(self):
        run = self._shownRun
        if run is None:
            return
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Save the run's report"),
                                              f"{self.logic.runName(run)}.html", _("HTML report (*.html)"))
        if path:
            self._runWithErrorDisplay(_("Could not write the report."), lambda: self._setStatus(
                _("Report written to {path}").format(path=self.logic.writeReport(run, path))))

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

    def _runWithErrorDisplay(self, message, function, waitCursor=True):
        """Run ``function``; an error goes to a dialog (tryWithErrorDisplay) and to the status line."""
        try:
            with slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor):
                function()
        except Exception as exc:  # already shown in the dialog; keep it visible in the panel too
            self._setStatus(f"{message} {describeError(exc)}", error=True)
