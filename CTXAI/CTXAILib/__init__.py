"""CTXAI engine: explains what a 3-D deep-learning model saw in an industrial CT volume.

The package is laid out in wings that import one way only (``README.md`` beside this file says which may import
which, and where new code goes): ``engine`` (torch, Captum, numpy, SimpleITK; never Slicer, Qt or VTK), ``checks``,
``records``, ``worker``, ``scene`` (the MRML bridge), ``synthetic`` (the embedded default), ``bench`` and the
``ctxai`` command line (``cli`` and ``commands``). Names are exported lazily: the Slicer GUI process
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
    "engine.explain": ["Explainer", "Explanation"],
    "engine.geometry": ["Box", "Volume", "read_volume", "write_volume"],
    "engine.methods": ["get_method", "list_methods"],
    "engine.modelcard": ["ModelCard"],
    "engine.models": ["LoadedModel", "load_model"],
    "engine.progress": ["Progress"],
    "engine.targets": ["BoxRegion", "ComponentRegion", "MaskRegion", "Target", "VoxelRegion", "WholeVolume",
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
