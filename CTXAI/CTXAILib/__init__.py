"""CTXAI engine: explains what a 3-D deep-learning model saw in an industrial CT volume.

Pure Python on torch, Captum, numpy and SimpleITK; it never imports Slicer, Qt or VTK, so the same code runs in the
Slicer worker process, the ``ctxai`` command line and the tests.

>>> from CTXAILib import Explainer, Target, read_volume                       # doctest: +SKIP
>>> result = Explainer("model.json").explain(read_volume("ct.nrrd"), "integrated_gradients", Target("pore"))
...                                                                          # doctest: +SKIP
"""

from .errors import (Cancelled, CTXAIError, InputError, LayerError, MethodError, ModelError, RegionError,
                     SettingError, TargetError)
from .explain import Explainer, Explanation
from .geometry import Box, Volume, read_volume, write_volume
from .methods import get_method, list_methods
from .modelcard import ModelCard
from .models import LoadedModel, load_model
from .progress import Progress
from .targets import BoxRegion, ComponentRegion, MaskRegion, Target, VoxelRegion, WholeVolume, parse_region

__version__ = "0.1.0"

__all__ = [
    "Box", "BoxRegion", "Cancelled", "ComponentRegion", "CTXAIError", "Explainer", "Explanation", "InputError",
    "LayerError", "LoadedModel", "MaskRegion", "MethodError", "ModelCard", "ModelError", "Progress", "RegionError",
    "SettingError", "Target", "TargetError", "Volume", "VoxelRegion", "WholeVolume", "get_method", "list_methods",
    "load_model", "parse_region", "read_volume", "write_volume", "__version__",
]
