"""CTXAI engine: explains what a 3-D deep-learning model saw in an industrial CT volume.

Pure Python on torch, Captum, numpy and SimpleITK; it never imports Slicer, Qt or VTK, so the same code runs in the
Slicer worker process, the ``ctxai`` command line and the tests. Names are exported lazily: the Slicer GUI process
imports the worker client and the scene bridge from this package without loading torch, which only the worker needs.

>>> from CTXAILib import Explainer, Target, read_volume                       # doctest: +SKIP
>>> result = Explainer("model.json").explain(read_volume("ct.nrrd"), "integrated_gradients", Target("pore"))
...                                                                          # doctest: +SKIP
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "errors": ["Cancelled", "CTXAIError", "InputError", "LayerError", "MethodError", "ModelError", "RegionError",
               "SettingError", "TargetError"],
    "explain": ["Explainer", "Explanation"],
    "geometry": ["Box", "Volume", "read_volume", "write_volume"],
    "methods": ["get_method", "list_methods"],
    "modelcard": ["ModelCard"],
    "models": ["LoadedModel", "load_model"],
    "progress": ["Progress"],
    "targets": ["BoxRegion", "ComponentRegion", "MaskRegion", "Target", "VoxelRegion", "WholeVolume",
                "parse_region"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'CTXAILib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
