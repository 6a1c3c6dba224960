"""Attribution methods. Importing this package registers every method; see :mod:`.registry`."""

from . import cam, gradient, lrp, perturbation  # noqa: F401  (each module registers its methods)
from .registry import MethodSpec, Setting, TileContext, VolumeContext, get_method, list_methods

__all__ = ["MethodSpec", "Setting", "TileContext", "VolumeContext", "get_method", "list_methods"]
