"""CTXAI: explains what a 3-D deep-learning model saw in an industrial CT volume (the Slicer module).

This file only wires the module. Slicer looks up ``CTXAIWidget``, ``CTXAILogic`` and ``CTXAITest`` by name in this
file's namespace, so they are imported here from ``CTXAIGuiLib`` beside it (``widget``, ``logic``, ``selftest``), with
the panel's state for console use (``parameters``: the parameter node class and its enums). They reach the Qt-free
code in ``CTXAILib``: :class:`CTXAILib.scene.session.ExplainSession` sends runs to a persistent worker process
(PythonSlicer, torch on the GPU) and builds the result nodes through the scene bridge (:mod:`CTXAILib.scene.bridge`).
The Slicer process itself never imports torch, and imports ``CTXAILib`` only lazily.
"""

from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule

from CTXAIGuiLib.logic import CTXAILogic
from CTXAIGuiLib.parameters import Colormap, CTXAIParameterNode, Score, Where
from CTXAIGuiLib.selftest import CTXAITest
from CTXAIGuiLib.widget import CTXAIWidget

__all__ = ["CTXAI", "CTXAILogic", "CTXAIParameterNode", "CTXAITest", "CTXAIWidget", "Colormap", "Score", "Where"]


class CTXAI(ScriptedLoadableModule):
    """The module's entry in Slicer's module list; the work is done by :class:`CTXAILogic`.

    >>> slicer.util.selectModule("CTXAI")
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CTXAI")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["Markups", "SubjectHierarchy", "VolumeRendering"]
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
