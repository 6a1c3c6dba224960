"""The CTXAI panel's state: a parameterNodeWrapper class, saved with the scene, and the enums of its choices.

Every parameter is bound to a widget of ``Resources/UI/CTXAI.ui`` through its SlicerParameterName property, or in
code through :data:`CTXAIGuiLib.widget.MANUAL_BINDINGS`. The annotations are evaluated by the wrapper, so this file
does not use ``from __future__ import annotations``.
"""

import enum
from pathlib import Path
from typing import Annotated, Optional

from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper

DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:2", "cuda:3")
PRECISIONS = ("fp32", "bf16", "fp16")
BLENDS = ("gaussian", "constant")  # CTXAILib.engine.modelcard.BLENDS: the GUI imports no engine module at load
DEFAULT_METHOD = "gradcam"


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
    from CTXAILib.synthetic.evaluation import bundled_models_dir

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
    overlap: Annotated[float, WithinRange(0.0, 0.95)] = 0.25  # set from the card's sliding_window on loading
    blend: Annotated[str, Choice(BLENDS)] = "gaussian"
    seed: Annotated[int, WithinRange(0, 999999)] = 0
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    colormap: Colormap = Colormap.Auto
    topPercent: Annotated[float, WithinRange(0.1, 100.0)] = 5.0
    render3d: bool = True
    resultTable: Optional[vtkMRMLTableNode]  # the selected run, by its summary table
