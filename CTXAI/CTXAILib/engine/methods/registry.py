"""The registry of attribution methods and the contexts their kernels receive.

Each :class:`MethodSpec` declares what the panel, the CLI and the scheduler need to know without running it: its
family, what the sign of its map means (:data:`~CTXAILib.engine.signs.SIGNS`), whether it needs a layer or hookable
Python modules, how its tiles combine, an estimate of model evaluations (for progress and ETA) and its settings with
type, default, range and help. The Slicer panel builds its controls from :meth:`MethodSpec.to_dict`.

Kernels come in two kinds:

- tile kernels (``aggregation`` "sum" or "blend") explain one model input tile: ``kernel(ctx: TileContext,
  settings) -> (C, D, H, W)``; "sum" kernels are linear in the target and their tiles add up exactly, "blend"
  kernels (CAMs) are blended with the sliding-window weights;
- volume kernels (``aggregation`` "volume") perturb the whole extent and query the tiled model through
  ``ctx.forward``: ``kernel(ctx: VolumeContext, settings) -> (C, D, H, W)``.

A tile kernel whose map depends on statistics of the whole target (Grad-CAM's channel weights are averages over
the whole feature map) declares ``statistics(ctx, settings) -> Tensor``: on a volume of several tiles the runner
sums it over all tiles first and hands the total to every tile as ``ctx.statistics``, so tiling does not change
what the weights mean.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ...errors import MethodError, SettingError
from ..signs import SIGNS

__all__ = ["Setting", "MethodSpec", "TileContext", "VolumeContext", "register", "get_method", "list_methods",
           "FAMILIES", "AGGREGATIONS"]

FAMILIES = ("gradient", "cam", "perturbation", "relevance", "prediction")
AGGREGATIONS = ("sum", "blend", "volume")
_KINDS = ("int", "float", "bool", "choice")


@dataclass(frozen=True)
class Setting:
    """One method setting: name, kind (int, float, bool, choice), default, range or choices, one-line help.

    >>> Setting("steps", "int", 32, "Integration steps.", minimum=2, maximum=1024).parse("64")
    64
    """

    name: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"setting kind must be one of {_KINDS}")

    def parse(self, value: Any, method: str = "") -> Any:
        """Convert (strings from the CLI included) and check the range; SettingError says what is allowed."""
        where = f"Setting {self.name!r}" + (f" of {method}" if method else "")
        try:
            if self.kind == "bool":
                if isinstance(value, str):
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = value.lower() in ("1", "true", "yes", "on")
                value = bool(value)
            elif self.kind == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = int(value)
            elif self.kind == "float":
                value = float(value)
                if not np.isfinite(value):
                    raise ValueError(value)
            else:
                value = str(value)
        except (TypeError, ValueError) as exc:
            raise SettingError(f"{where} must be {'a whole number' if self.kind == 'int' else 'a ' + self.kind}, "
                               f"got {value!r}.") from exc
        if self.kind == "choice" and value not in self.choices:
            raise SettingError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}.")
        if self.minimum is not None and value < self.minimum or self.maximum is not None and value > self.maximum:
            raise SettingError(f"{where} must lie in [{self.minimum}, {self.maximum}], got {value!r}.")
        return value

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "type": self.kind, "default": self.default, "help": self.help}
        if self.minimum is not None:
            data["min"] = self.minimum
        if self.maximum is not None:
            data["max"] = self.maximum
        if self.choices:
            data["choices"] = list(self.choices)
        return data


@dataclass(frozen=True)
class MethodSpec:
    """A registered attribution method (see the module docstring)."""

    name: str
    label: str
    family: str
    summary: str
    sign: str  # a key of SIGNS: "attribution", "sensitivity" or "magnitude"
    aggregation: str
    kernel: Callable[..., torch.Tensor]
    samples: Callable[[dict, tuple[int, int, int]], float]
    settings: tuple[Setting, ...] = ()
    statistics: Callable[..., torch.Tensor] | None = None
    needs_layer: bool = False
    needs_hooks: bool = False
    needs_gradient: bool = True
    segmentation_only: bool = False
    absolute: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES or self.aggregation not in AGGREGATIONS or self.sign not in SIGNS:
            raise ValueError(f"bad family/aggregation/sign for {self.name}")

    @property
    def signed(self) -> bool:
        """Whether the map has two signs worth showing (attribution or sensitivity)."""
        return SIGNS[self.sign].signed

    def validate(self, settings: dict[str, Any] | None) -> dict[str, Any]:
        """Settings with defaults filled in, each parsed and range-checked."""
        given = dict(settings or {})
        known = {s.name: s for s in self.settings}
        unknown = sorted(set(given) - set(known))
        if unknown:
            allowed = ", ".join(known) or "none"
            raise SettingError(f"Unknown setting(s) {', '.join(map(repr, unknown))} for {self.name}; its settings "
                               f"are: {allowed}.")
        return {name: s.parse(given[name], self.name) if name in given else s.default for name, s in known.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "label": self.label, "family": self.family, "summary": self.summary,
            "sign": self.sign, "signed": self.signed, "needs_layer": self.needs_layer, "needs_hooks": self.needs_hooks,
            "needs_gradient": self.needs_gradient, "segmentation_only": self.segmentation_only,
            "aggregation": self.aggregation, "settings": [s.to_dict() for s in self.settings],
        }


@dataclass
class TileContext:
    """What a tile kernel gets: the input tile, the target as a scalar-per-sample module, and helpers."""

    x: torch.Tensor                         # (1, C, D, H, W) normalised input tile, on the run's device
    score: nn.Module                        # x (N, C, D, H, W) -> (N,) target score; counts and cancels
    model: Any                              # the LoadedModel
    layer: nn.Module | None                 # the CAM layer, resolved
    baseline: Callable[..., torch.Tensor]   # (kind, sigma_mm) -> (1, C, D, H, W) baseline crop for this tile
    batch_size: int                         # samples per model call allowed by the memory budget
    seed: int
    statistics: torch.Tensor | None = None  # summed over every tile, for kernels that declare ``statistics``


@dataclass
class VolumeContext:
    """What a volume kernel gets: the whole extent and the tiled model as ``forward``."""

    x: torch.Tensor                                   # (1, C, D, H, W) normalised extent (CPU)
    forward: Callable[[torch.Tensor], torch.Tensor]   # (N, C, D, H, W) -> (N,) target score of the tiled model
    baseline: Callable[..., torch.Tensor]             # (kind, sigma_mm) -> (1, C, D, H, W)
    batch_size: int
    seed: int
    spacing: tuple[float, float, float]               # mm along i, j, k
    target: Any                                       # the ResolvedTarget
    probabilities: Callable[[], np.ndarray] | None = field(default=None)  # blended (C, D, H, W) over the extent
    tiles: list = field(default_factory=list)         # per tile: (Box in extent coordinates, () -> ScoreModel)
    tick: Callable[[float], None] | None = None       # counts model evaluations made without ``forward``; cancels
    notes: list[str] = field(default_factory=list)    # what the user should know about how the map was made


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise MethodError(f"Unknown method {name!r}.{hint} Available: {', '.join(_REGISTRY)} "
                          "(`ctxai methods` describes them).")
    return _REGISTRY[name]


def list_methods() -> list[MethodSpec]:
    return list(_REGISTRY.values())
