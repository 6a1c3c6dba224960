"""The CTXAI self-test, run inside Slicer (Reload and Test, ``slicer.selfTests["CTXAI"]`` or ctest)."""

import json
import logging
import time

import numpy as np

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from CTXAIGuiLib.parameters import Where


class CTXAITest(ScriptedLoadableModuleTest):
    """Checks inside Slicer. Always: a run's nodes, views and relabelling through the logic (no worker, no torch).
    With PyTorch and the requirements installed, end to end on a synthetic phantom with the bundled models: the
    console API, the panel (Explain and Cancel), and that a failed run adds nothing to the scene. Without them those
    are skipped with a message: under testing Slicer installs nothing (``pip_ensure(skip_in_testing=True)``), and a
    clean Slicer must not download torch during ctest.

    >>> slicer.selfTests["CTXAI"]()
    """

    phantomCache = None

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RunNodesWithoutWorker()
        missing = slicer.util.getModuleLogic("CTXAI").missingDependencies()
        if missing:
            message = _("Skipped the CTXAI tests that run models: these Python packages are not installed: "
                        "{packages}. Press Explain once to install them, then run the test again.").format(
                packages=", ".join(missing))
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_ConsoleExplainsPhantom()
        self.setUp()
        self.test_PanelExplainsAndCancels()
        self.setUp()
        self.test_FailedRunAddsNothing()

    def _phantom(self):
        """A 96^3 phantom with known pores and inclusions (generated once), as a new volume node."""
        if CTXAITest.phantomCache is None:
            from CTXAILib.synthetic.phantom import generate_phantom

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

    def test_RunNodesWithoutWorker(self):
        self.delayDisplay("A run's nodes, views, relabelling and colours (no worker)")
        from CTXAILib.engine.geometry import Volume
        from CTXAILib.scene import bridge

        k, j, i = np.indices((24, 28, 32))
        ct = np.where((k - 12) ** 2 + (j - 14) ** 2 + (i - 16) ** 2 < 64, 3000.0, -1000.0).astype(np.float32)
        volume = slicer.util.addVolumeFromArray(ct, name="CTXAI sphere")
        attribution = Volume(np.exp(-((k - 12) ** 2 + (j - 14) ** 2 + (i - 16) ** 2) / 20.0).astype(np.float32),
                             volume.GetSpacing(), volume.GetOrigin(), np.eye(3))
        logic = slicer.util.getModuleLogic("CTXAI")
        run = bridge.add_run(slicer.mrmlScene, volume, attribution, {"method": "saliency", "signed": False,
                                                                      "target": {"class": "void"}},
                             volume_rendering_logic=logic.volumeRenderingLogic)
        self._checkRun(run, volume, "CTXAI heat", hasConfidence=False)
        labels = slicer.mrmlScene.GetNodeByID(run.labels)
        relevant = np.count_nonzero(slicer.util.arrayFromVolume(labels))
        logic.setTopPercent(run, 50.0)
        self.assertGreater(np.count_nonzero(slicer.util.arrayFromVolume(labels)), relevant)
        logic.setColormap(run, "diverging")
        self.assertEqual([r.attribution for r in logic.runs()], [run.attribution])
        self.delayDisplay("Run nodes passed")

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
