"""The model card: the JSON file beside a model's weights that says what the model expects and predicts.

Schema (every key is validated on load; an error names the file, the key and the fix)::

    {
      "name": "ctxai-defect-classifier",          # shown in the panel
      "version": "1.0",                            # optional
      "description": "...",                        # optional
      "task": "classification" | "segmentation",
      "class_names": ["normal", "pore", ...],      # one per output channel
      "input_channels": 1,
      "patch_size": [48, 48, 48],                  # voxels along i, j, k (null: any size, whole volume at once)
      "spacing_mm": [0.2, 0.2, 0.2],               # voxel spacing the model was trained at, along i, j, k (optional)
      "resample_to_spacing": false,                # true: resample inputs to spacing_mm, maps back (engine/resample.py)
      "normalization": {"type": "window", "window": [-1000, 4000]}
                     | {"type": "meanstd", "mean": 1200.0, "std": 1500.0}
                     | {"type": "minmax"} | {"type": "minmax", "range": [0, 65535]}
                     | {"type": "percentile", "percentiles": [0.5, 99.5]}  # + "mean", "std", "nonzero",
                                                                               #   "clip" (fixed raw bounds)
                     | {"type": "none"},                 # see "Normalisations" below
      "air_value": -1000,                          # raw grey value of air (baseline "air"); optional
      "output_activation": "softmax" | "sigmoid" | "none",
      "default_cam_layer": "features.block4",      # optional; else the last conv layer
      "sliding_window": {"overlap": 0.5, "blend": "gaussian" | "constant"},  # optional: the model's own tiling
      "format": "torchscript" | "state_dict",
      "weights": "classifier.pt",                  # relative to the card
      "sha256": "<hex digest of the weights file>",# optional but checked when present
      "architecture": {"name": "ctxai.DefectClassifier3D", "params": {...}},  # state_dict only
      "metrics": {...}, "training": {...}          # optional, free-form (quality figures, provenance)
    }

Normalisations (``x`` raw grey value, ``n`` what the model gets, float32)::

    none        n = x
    window      n = b0 + (b1 - b0) * clip((x - lo) / (hi - lo), 0, 1)      window [lo, hi]
    meanstd     n = (x - mean) / std
    minmax      n = b0 + (b1 - b0) * (x - lo) / (hi - lo)                 range [lo, hi], or the volume's
                                                                            [min, max] when no range is given
    percentile  c = clip(x, P(p_low), P(p_high));  n = (c - mean) / std     P: the volume's percentiles;
                                                                            mean, std given, or those of c

``[b0, b1]`` is ``"output"`` (window and minmax only; default [0, 1]). ``"nonzero": true`` (percentile) computes
the statistics over the non-zero voxels only and leaves zero voxels at 0, as MONAI's ``NormalizeIntensity`` does;
percentiles [0, 100] without mean and std are the per-image z-score. A statistic of the volume (minmax without a
range; percentile bounds, and mean and std when not given) is computed once per volume, over all its voxels and
channels, from the unperturbed input, before any tiling: every tile, perturbed copy and baseline of a run is
normalised with the same numbers (an occluded or noisy copy does not get new ones), so a perturbation method
measures the model's answer to the change itself. The run record states the numbers used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from .files import regular_file

__all__ = ["Normalization", "ModelCard", "TASKS", "ACTIVATIONS", "FORMATS", "BLENDS"]

TASKS = ("classification", "segmentation")
ACTIVATIONS = ("softmax", "sigmoid", "none")
FORMATS = ("torchscript", "state_dict")
# How overlapping tiles' outputs are weighted: "gaussian" favours tile centres (MONAI's and nnU-Net's default),
# "constant" is a plain average of the tiles that cover a voxel.
BLENDS = ("gaussian", "constant")


@dataclass(frozen=True)
class Normalization:
    """Maps raw grey values to what the model was trained on (formulas in the module docstring).

    >>> Normalization("window", window=(-1000.0, 3000.0)).apply(np.array([-1000.0, 1000.0, 5000.0]))
    array([0. , 0.5, 1. ], dtype=float32)
    >>> Normalization("minmax").fitted(np.array([10.0, 30.0])).range
    (10.0, 30.0)
    """

    type: str = "none"
    window: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    range: tuple[float, float] | None = None         # minmax: raw values mapped to the output's ends
    percentiles: tuple[float, float] | None = None   # percentile: clip bounds as percentiles of the volume
    clip: tuple[float, float] | None = None          # percentile: those bounds in raw grey values, once fitted
    nonzero: bool = False                            # percentile: statistics over non-zero voxels only
    output: tuple[float, float] | None = None        # window, minmax: [b0, b1], default [0, 1]

    @property
    def per_volume(self) -> bool:
        """True when a statistic is still to be computed from the volume (see :meth:`fitted`)."""
        if self.type == "minmax":
            return self.range is None
        if self.type == "percentile":
            return self.clip is None or self.mean is None or self.std is None
        return False

    def fitted(self, raw: np.ndarray) -> Normalization:
        """This normalisation with the volume's statistics filled in (itself when it needs none).

        ``raw`` is the whole unperturbed volume, any shape; the statistics cover all its voxels and channels."""
        if not self.per_volume:
            return self
        raw = np.asarray(raw)
        if self.type == "minmax":
            return replace(self, range=(float(np.min(raw)), float(np.max(raw))))
        values = raw[raw != 0] if self.nonzero else raw.ravel()
        if values.size == 0:
            return replace(self, clip=(0.0, 0.0), mean=0.0, std=1.0)
        clip = self.clip or tuple(float(v) for v in np.percentile(values, self.percentiles))
        clipped = np.clip(values, clip[0], clip[1])
        mean = self.mean if self.mean is not None else float(np.mean(clipped, dtype=np.float64))
        std = self.std if self.std is not None else float(np.std(clipped, dtype=np.float64))
        # A constant volume has no spread: it is centred, not divided by zero.
        return replace(self, clip=clip, mean=mean, std=std if std > 0 else 1.0)

    def apply(self, raw: np.ndarray | float) -> np.ndarray:
        """``raw`` normalised, float32. A per-volume normalisation is first fitted to ``raw`` itself: to normalise
        a part of a volume (or a single value) like the whole, apply :meth:`fitted` of the whole volume."""
        raw = np.asarray(raw, dtype=np.float32)
        norm = self.fitted(raw)
        b0, b1 = (np.float32(v) for v in norm.output or (0.0, 1.0))
        if norm.type in ("window", "minmax"):
            lo, hi = norm.window if norm.type == "window" else norm.range
            unit = (raw - np.float32(lo)) / np.float32(hi - lo if hi > lo else 1.0)
            if norm.type == "window":
                unit = np.clip(unit, 0.0, 1.0)
            return (b0 + (b1 - b0) * unit).astype(np.float32)
        if norm.type == "meanstd":
            return ((raw - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)
        if norm.type == "percentile":
            scaled = ((np.clip(raw, np.float32(norm.clip[0]), np.float32(norm.clip[1])) - np.float32(norm.mean))
                      / np.float32(norm.std)).astype(np.float32)
            return np.where(raw != 0, scaled, np.float32(0.0)) if norm.nonzero else scaled
        return raw

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type}
        for key in ("window", "mean", "std", "range", "percentiles", "clip", "output"):
            value = getattr(self, key)
            if value is not None:
                data[key] = list(value) if isinstance(value, tuple) else value
        if self.nonzero:
            data["nonzero"] = True
        return data


@dataclass
class ModelCard:
    """What a model expects and predicts; see the module docstring for the JSON schema.

    >>> card = ModelCard.from_dict({"name": "m", "task": "classification", "class_names": ["a", "b"],
    ...                             "format": "torchscript", "weights": "m.pt"})
    >>> card.class_index("b"), card.patch_size
    (1, None)
    """

    name: str
    task: str
    class_names: list[str]
    format: str
    weights: str
    input_channels: int = 1
    patch_size: tuple[int, int, int] | None = None
    spacing_mm: tuple[float, float, float] | None = None
    resample_to_spacing: bool = False
    normalization: Normalization = field(default_factory=Normalization)
    air_value: float | None = None
    output_activation: str = "softmax"
    default_cam_layer: str | None = None
    sliding_window: dict[str, Any] = field(default_factory=dict)  # {"overlap": float, "blend": str}, both optional
    sha256: str | None = None
    architecture: dict[str, Any] | None = None
    version: str | None = None
    description: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def weights_path(self) -> Path:
        base = self.path.parent if self.path is not None else Path.cwd()
        return (base / self.weights).resolve()

    @property
    def patch_shape(self) -> tuple[int, int, int] | None:
        """The patch in array order (k, j, i)."""
        return None if self.patch_size is None else tuple(reversed(self.patch_size))

    def class_index(self, name: str | int) -> int:
        """Index of a class given by name or number; raises TargetError listing the classes."""
        from ..errors import TargetError

        if isinstance(name, (int, np.integer)) or (isinstance(name, str) and name.isdigit()):
            index = int(name)
            if 0 <= index < len(self.class_names):
                return index
        elif name in self.class_names:
            return self.class_names.index(name)
        raise TargetError(f"Class {name!r} is not predicted by model {self.name!r}. Its classes are "
                          f"{', '.join(repr(c) for c in self.class_names)} (or their numbers 0-"
                          f"{len(self.class_names) - 1}). Pick one of those.")

    def raw_air(self, volume_min: float) -> float:
        """Raw grey value of air: the card's, else the volume's minimum (air is the darkest thing in CT)."""
        return float(self.air_value) if self.air_value is not None else float(volume_min)

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = regular_file(path, "Model card", ModelError)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"Model card {path} is not valid JSON ({exc}). Fix the file or regenerate it.") from exc
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | Path | None = None) -> ModelCard:
        where = f"Model card {path}" if path else "Model card"
        if not isinstance(data, dict):
            raise ModelError(f"{where} must be a JSON object, got {type(data).__name__}.")

        def need(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in data:
                raise ModelError(f"{where} has no {key!r}. Add it (see the schema in CTXAILib/modelcard.py).")
            return check(key, kind)

        def check(key: str, kind: type | tuple[type, ...]) -> Any:
            value = data.get(key)
            if value is not None and not isinstance(value, kind):
                names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise ModelError(f"{where}: {key!r} must be {names}, got {value!r}.")
            return value

        def choice(key: str, allowed: tuple[str, ...], default: str | None = None) -> str:
            if default is None:
                need(key, str)
            value = data.get(key, default)
            if value not in allowed:
                raise ModelError(f"{where}: {key!r} must be one of {', '.join(allowed)}, got {value!r}.")
            return value

        def triple(key: str, kind: type, positive: bool = True) -> tuple | None:
            value = data.get(key)
            if value is None:
                return None
            if (not isinstance(value, list) or len(value) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                    or (kind is int and not all(float(v).is_integer() for v in value))
                    or (positive and not all(v > 0 for v in value))):
                raise ModelError(f"{where}: {key!r} must be three positive {kind.__name__}s along i, j, k, "
                                 f"got {value!r}.")
            return tuple(kind(v) for v in value)

        name = need("name", str)
        task = choice("task", TASKS)
        class_names = need("class_names", list)
        if not class_names or not all(isinstance(c, str) and c for c in class_names):
            raise ModelError(f"{where}: 'class_names' must be a non-empty list of names, got {class_names!r}.")
        if len(set(class_names)) != len(class_names):
            raise ModelError(f"{where}: 'class_names' has duplicates: {class_names!r}.")
        fmt = choice("format", FORMATS)
        weights = need("weights", str)
        channels = check("input_channels", int) or 1
        if channels < 1:
            raise ModelError(f"{where}: 'input_channels' must be at least 1, got {channels}.")
        architecture = check("architecture", dict)
        if fmt == "state_dict":
            if not architecture or not isinstance(architecture.get("name"), str):
                raise ModelError(f"{where}: a state_dict model needs 'architecture': {{'name': ..., 'params': {{...}}}}"
                                 " naming the network class (e.g. ctxai.UNet3D or monai.networks.nets.UNet).")
            if not isinstance(architecture.get("params", {}), dict):
                raise ModelError(f"{where}: 'architecture.params' must be an object of keyword arguments.")
        resample = check("resample_to_spacing", bool) or False
        if resample and data.get("spacing_mm") is None:
            raise ModelError(f"{where}: 'resample_to_spacing' needs 'spacing_mm', the spacing to resample to.")
        sha = check("sha256", str)
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise ModelError(f"{where}: 'sha256' must be 64 hexadecimal digits, got {sha!r}.")
        return cls(
            name=name,
            task=task,
            class_names=list(class_names),
            format=fmt,
            weights=weights,
            input_channels=channels,
            patch_size=triple("patch_size", int),
            spacing_mm=triple("spacing_mm", float),
            resample_to_spacing=resample,
            normalization=_normalization(data.get("normalization"), where),
            air_value=check("air_value", (int, float)),
            output_activation=choice("output_activation", ACTIVATIONS, "softmax"),
            default_cam_layer=check("default_cam_layer", str),
            sliding_window=_sliding_window(check("sliding_window", dict), where),
            sha256=sha.lower() if sha else None,
            architecture=architecture,
            version=None if data.get("version") is None else str(data["version"]),
            description=check("description", str),
            metrics=check("metrics", dict) or {},
            training=check("training", dict) or {},
            path=Path(path).resolve() if path else None,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        if not self.resample_to_spacing:
            data.pop("resample_to_spacing")
        data["normalization"] = self.normalization.to_dict()
        for key in ("patch_size", "spacing_mm"):
            data[key] = None if data[key] is None else list(data[key])
        return {k: v for k, v in data.items() if v is not None and v != {}}

    def save(self, path: str | Path) -> None:
        from .geometry import atomic_output

        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.path = Path(path).resolve()


def _pair(spec: dict, key: str, where: str, kind: str, increasing: bool = True) -> tuple[float, float] | None:
    value = spec.get(key)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or (increasing and value[1] <= value[0])):
        raise ModelError(f"{where}: {kind} normalisation needs {key!r}: [low, high] with low < high, got {value!r}.")
    return float(value[0]), float(value[1])


def _sliding_window(spec: dict | None, where: str) -> dict[str, Any]:
    """The card's own tiling: ``overlap`` in [0, 1) and ``blend`` one of :data:`BLENDS`, each optional."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - {"overlap", "blend"})
    if unknown:
        raise ModelError(f"{where}: 'sliding_window' takes 'overlap' and 'blend', not {', '.join(unknown)}.")
    overlap = spec.get("overlap")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, (int, float))
                                or not 0.0 <= overlap < 1.0):
        raise ModelError(f"{where}: 'sliding_window.overlap' must be a fraction in [0, 1) of the patch shared by "
                         f"neighbouring tiles (e.g. 0.5), got {overlap!r}.")
    if "blend" in spec and spec["blend"] not in BLENDS:
        raise ModelError(f"{where}: 'sliding_window.blend' must be one of {', '.join(BLENDS)}, got "
                         f"{spec['blend']!r}.")
    return {**({"overlap": float(overlap)} if overlap is not None else {}),
            **({"blend": spec["blend"]} if "blend" in spec else {})}


def _normalization(spec: Any, where: str) -> Normalization:
    if spec is None:
        return Normalization()
    if not isinstance(spec, dict):
        raise ModelError(f"{where}: 'normalization' must be an object, got {spec!r}.")
    kind = spec.get("type")
    allowed = {"none": set(), "window": {"window", "output"}, "meanstd": {"mean", "std"},
               "minmax": {"range", "output"}, "percentile": {"percentiles", "mean", "std", "nonzero", "clip"}}
    if kind not in allowed:
        raise ModelError(f"{where}: normalisation 'type' must be window, meanstd, minmax, percentile or none, "
                         f"got {kind!r}.")
    extra = set(spec) - allowed[kind] - {"type"}
    if extra:
        raise ModelError(f"{where}: {kind} normalisation has no {', '.join(sorted(map(repr, extra)))}; its keys are "
                         f"{', '.join(sorted(allowed[kind])) or 'none'} (formulas in CTXAILib/engine/modelcard.py).")
    output = _pair(spec, "output", where, kind, increasing=False)
    if kind == "window":
        window = _pair(spec, "window", where, kind)
        if window is None:
            raise ModelError(f"{where}: window normalisation needs 'window': [low, high] with low < high.")
        return Normalization("window", window=window, output=output)
    if kind == "minmax":
        return Normalization("minmax", range=_pair(spec, "range", where, kind), output=output)
    mean, std = spec.get("mean"), spec.get("std")
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ModelError(f"{where}: {kind} normalisation needs a number {key!r}, got {value!r}.")
    if std is not None and std <= 0:
        raise ModelError(f"{where}: {kind} normalisation needs 'std' > 0, got {std!r}.")
    if kind == "meanstd":
        if mean is None or std is None:
            raise ModelError(f"{where}: mean-std normalisation needs numbers 'mean' and 'std' > 0, got {spec!r}.")
        return Normalization("meanstd", mean=float(mean), std=float(std))
    if kind == "percentile":
        percentiles = _pair(spec, "percentiles", where, kind)
        if percentiles is None or percentiles[0] < 0 or percentiles[1] > 100:
            raise ModelError(f"{where}: percentile normalisation needs 'percentiles': [low, high] with "
                             f"0 <= low < high <= 100, got {spec.get('percentiles')!r}.")
        if not isinstance(spec.get("nonzero", False), bool):
            raise ModelError(f"{where}: percentile normalisation's 'nonzero' must be true or false.")
        return Normalization("percentile", percentiles=percentiles, clip=_pair(spec, "clip", where, kind),
                             mean=None if mean is None else float(mean), std=None if std is None else float(std),
                             nonzero=spec.get("nonzero", False))
    return Normalization()
