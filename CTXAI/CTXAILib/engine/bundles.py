"""MONAI bundles as models: a bundle folder read into a model card and a way to build its network.

What is read from ``BUNDLE/``::

    configs/metadata.json      network_data_format: input channels; output channels, their names (channel_def)
                               and kind (an "image" output is a segmentation, anything else a classification)
    configs/inference.json     network_def (``_target_`` + arguments), the inferer's roi_size (the patch), the
      (or .yaml / .yml)        preprocessing's intensity transform and Spacing(d) (the card's spacing), the
                               postprocessing's Activations(d) (the output activation)
    models/model.pt            a state_dict, loaded with ``weights_only=True``; else
    models/model.ts            TorchScript

Intensity transforms map onto the card's normalisations (:mod:`.modelcard`): ScaleIntensityRange(d) is a window
(``clip``) or a fixed min-max range with ``b_min``/``b_max`` as output; ScaleIntensity(d) is the per-volume min-max;
NormalizeIntensity(d) is mean-std with ``subtrahend``/``divisor``, else the per-image z-score (percentiles 0-100,
``nonzero`` kept). Any other transform that can change intensities is refused, named. Spacing(d)'s ``pixdim`` becomes
the card's spacing: CTXAI never resamples, it warns when the volume's spacing differs.

References ``@id`` to other entries (and to ``@_meta_::...``) are resolved here. A value that is a Python expression
(``$...``) runs arbitrary Python from the bundle, so it is refused unless the caller trusts the bundle
(``trust_code=True``, ``--trust-bundle-code``); then MONAI's own ConfigParser evaluates it, and it also builds a
network that is not one of ``monai.networks.nets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import ModelError
from .modelcard import ModelCard, Normalization
from .networks import build_architecture

__all__ = ["Bundle", "read_bundle", "INTENSITY_TRANSFORMS"]

_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
_WEIGHTS = (("model.pt", "state_dict"), ("model.ts", "torchscript"))
_SEPARATORS = ("::", "#")  # MONAI's id separator, and the one older bundles use
_NEUTRAL_SPATIAL = {"Orientation", "Orientationd", "Resize", "Resized", "Zoom", "Zoomd", "Flip", "Flipd",
                    "Rotate90", "Rotate90d"}


@dataclass
class Bundle:
    """A bundle read into a model card. ``build`` makes the untrained network of a state_dict bundle (None for
    TorchScript); ``warnings`` say what was assumed or left out."""

    folder: Path
    card: ModelCard
    build: Callable[[], nn.Module] | None
    warnings: list[str] = field(default_factory=list)


class _Config:
    """The inference config with ``@`` references resolved, ``$`` expressions refused or (trusted) evaluated."""

    def __init__(self, folder: Path, config_file: Path, config: dict, metadata: dict, trust_code: bool):
        self.folder = folder
        self.file = config_file
        self.root = {**config, "_meta_": metadata}
        self.trust_code = trust_code
        self._parser = None

    @property
    def parser(self):
        if self._parser is None:
            from monai.bundle import ConfigParser

            self._parser = ConfigParser()
            self._parser.read_meta(str(self.folder / "configs" / "metadata.json"))
            self._parser.read_config(str(self.file))
        return self._parser

    def raw(self, item: str, default: Any = KeyError) -> Any:
        value: Any = self.root
        parts = item
        for separator in _SEPARATORS:
            parts = parts.replace(separator, "\0")
        for part in parts.split("\0"):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            elif default is KeyError:
                raise ModelError(f"Bundle {self.folder}: {self.file.name} refers to {item!r}, which it does not "
                                 "define. Fix the reference in the bundle's config.")
            else:
                return default
        return value

    def follow(self, item: str) -> tuple[str, Any]:
        """The id an entry's chain of ``@`` references ends at, and its raw value there (None when missing)."""
        value = self.raw(item, None)
        for _ in range(32):
            if not (isinstance(value, str) and value.startswith("@")):
                return item.replace("#", "::"), value
            item = value[1:]
            value = self.raw(item)
        raise ModelError(f"Bundle {self.folder}: the references at {item!r} in {self.file.name} form a loop. "
                         "Fix the bundle's config.")

    def get(self, item: str, default: Any = None) -> Any:
        """The entry ``item`` resolved; only what is read is resolved, so an expression in an entry CTXAI does not
        use (a device, a data path) is neither run nor refused."""
        item, value = self.follow(item)
        return default if value is None else self.resolve(value, item)

    def entries(self, item: str) -> list[_Entry]:
        """The components (``_target_`` objects) of a transform list or Compose at ``item``."""
        item, value = self.follow(item)
        if isinstance(value, dict) and "transforms" in value:
            item, value = self.follow(f"{item}::transforms")
        elif isinstance(value, dict):
            return [_Entry(self, item)] if "_target_" in value else []
        found = []
        for index in range(len(value) if isinstance(value, list) else 0):
            sub, component = self.follow(f"{item}::{index}")
            if isinstance(component, dict) and "_target_" in component:
                found.append(_Entry(self, sub))
        return found

    def resolve(self, value: Any, item: str, depth: int = 0) -> Any:
        if depth > 32:
            raise ModelError(f"Bundle {self.folder}: the references at {item!r} in {self.file.name} form a loop. "
                             "Fix the bundle's config.")
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{item}::{k}", depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, f"{item}::{i}", depth + 1) for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value
        if value.startswith("$"):
            if not self.trust_code:
                raise ModelError(
                    f"Bundle {self.folder}: {self.file.name} entry {item!r} is a Python expression ({value[:60]!r}). "
                    "Evaluating it would run arbitrary Python from the bundle, so CTXAI refuses it: pass "
                    "--trust-bundle-code (trust_code=True) if you trust the bundle's author, or replace the "
                    "expression by its value.")
            return self.parser.get_parsed_content(item)
        if value.startswith("%"):
            raise ModelError(f"Bundle {self.folder}: {self.file.name} entry {item!r} is a macro into another file "
                             f"({value[:60]!r}), which CTXAI does not follow. Copy the entry it names in its place.")
        if value.startswith("@"):
            return self.resolve(self.raw(value[1:]), value[1:].replace("#", "::"), depth + 1)
        return value


@dataclass
class _Entry:
    """One component of the config (a transform, the inferer): its class name and its resolved arguments."""

    config: _Config
    item: str

    @property
    def name(self) -> str:
        return str(self.config.get(f"{self.item}::_target_", "")).rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(f"{self.item}::{key}", default)

    def number(self, key: str, default: float | None = None) -> float | None:
        value = self.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ModelError(f"Bundle {self.config.folder}: {self.name}'s {key!r} is {value!r}; CTXAI maps only a "
                             "single number onto a model card. Write a model card for the bundle's weights.")
        return None if value is None else float(value)

    def refuse(self, why: str) -> ModelError:
        return ModelError(f"Bundle {self.config.folder}: {self.name} {why} has no model-card normalisation. Write a "
                          "model card for the bundle's weights with the normalisation stated.")


def _read(path: Path, folder: Path) -> dict:
    from monai.bundle import ConfigParser

    try:
        # MONAI's own reader: YAML through a SafeLoader (no tag can construct an object), duplicate keys refused.
        data = ConfigParser.load_config_file(str(path))
    except Exception as exc:  # noqa: BLE001 - JSON, YAML and decoding errors all mean the same to the analyst
        raise ModelError(f"Bundle {folder}: {path.name} cannot be read ({str(exc).splitlines()[0]}). Fix the "
                         "file.") from exc
    if not isinstance(data, dict):
        raise ModelError(f"Bundle {folder}: {path.name} must hold an object (key: value), got "
                         f"{type(data).__name__}.")
    return data


def _scale_range(t: _Entry) -> Normalization:
    lo, hi = t.number("a_min"), t.number("a_max")
    if lo is None or hi is None or hi <= lo:
        raise t.refuse(f"with a_min {lo} and a_max {hi} (not low < high)")
    b_min, b_max = t.number("b_min"), t.number("b_max")
    output = None if b_min is None or b_max is None or (b_min, b_max) == (0.0, 1.0) else (b_min, b_max)
    if t.get("clip", False):
        return Normalization("window", window=(lo, hi), output=output)
    return Normalization("minmax", range=(lo, hi), output=output)


def _scale(t: _Entry) -> Normalization:
    if t.get("factor") is not None or t.get("channel_wise"):
        raise t.refuse("with 'factor' or 'channel_wise'")
    b_min, b_max = t.number("minv", 0.0), t.number("maxv", 1.0)
    return Normalization("minmax", output=None if (b_min, b_max) == (0.0, 1.0) else (b_min, b_max))


def _normalize(t: _Entry) -> Normalization:
    if t.get("channel_wise"):
        raise t.refuse("with channel_wise=true")
    mean, std = t.number("subtrahend"), t.number("divisor")
    if mean is not None and std is not None and std > 0 and not t.get("nonzero"):
        return Normalization("meanstd", mean=mean, std=std)
    if mean is None and std is None:
        return Normalization("percentile", percentiles=(0.0, 100.0), nonzero=bool(t.get("nonzero", False)))
    raise t.refuse("with only one of subtrahend and divisor, a divisor <= 0, or fixed ones and nonzero=true")


INTENSITY_TRANSFORMS: dict[str, Callable[[_Entry], Normalization]] = {
    "ScaleIntensityRange": _scale_range, "ScaleIntensityRanged": _scale_range,
    "ScaleIntensity": _scale, "ScaleIntensityd": _scale,
    "NormalizeIntensity": _normalize, "NormalizeIntensityd": _normalize,
}
"""MONAI intensity transforms (array and dictionary forms) and the card normalisation each one becomes."""


def _changes_intensities(name: str) -> bool:
    """True for a transform of MONAI's intensity modules, and for anything not from MONAI (unknown effect)."""
    import monai.transforms as transforms
    import monai.transforms.intensity.array as array
    import monai.transforms.intensity.dictionary as dictionary

    return hasattr(array, name) or hasattr(dictionary, name) or not hasattr(transforms, name)


def _applies_to(transform: _Entry, image_key: str) -> bool:
    keys = transform.get("keys")
    return keys is None or image_key in (keys if isinstance(keys, list) else [keys])


def _preprocessing(config: _Config, image_key: str, warnings: list[str]
                   ) -> tuple[Normalization, tuple[float, float, float] | None]:
    normalizations, refused, spacing = [], [], None
    for transform in config.entries("preprocessing"):
        name = transform.name
        if not _applies_to(transform, image_key):
            continue
        if name in INTENSITY_TRANSFORMS:
            normalizations.append((name, INTENSITY_TRANSFORMS[name](transform)))
        elif name in ("Spacing", "Spacingd"):
            pixdim = transform.get("pixdim")
            pixdim = [pixdim] * 3 if isinstance(pixdim, (int, float)) else pixdim
            if (not isinstance(pixdim, list) or len(pixdim) != 3
                    or not all(isinstance(v, (int, float)) and v > 0 for v in pixdim)):
                raise ModelError(f"Bundle {config.folder}: {name}'s pixdim {pixdim!r} is not three positive "
                                 "spacings. Fix it in the bundle's config.")
            spacing = tuple(float(v) for v in pixdim)
        elif name in _NEUTRAL_SPATIAL:
            warnings.append(f"The bundle's preprocessing applies {name}, which CTXAI does not: the volume is fed "
                            "in its own voxel order and grid. Reorient or resize it in Slicer if the model needs it.")
        elif _changes_intensities(name):
            refused.append(name)
    if refused:
        raise ModelError(f"Bundle {config.folder}: its preprocessing uses {', '.join(refused)}, which can change "
                         "intensities and has no model-card normalisation (CTXAI maps ScaleIntensityRange(d), "
                         "ScaleIntensity(d) and NormalizeIntensity(d)). Write a model card for the bundle's weights "
                         "with the normalisation stated.")
    if len(normalizations) > 1:
        chain = " then ".join(name for name, _ in normalizations)
        raise ModelError(f"Bundle {config.folder}: its preprocessing chains {chain}; a model card states one "
                         "normalisation. Write a model card for the bundle's weights.")
    return (normalizations[0][1] if normalizations else Normalization()), spacing


def _activation(config: _Config, channels: int, warnings: list[str]) -> str:
    for transform in config.entries("postprocessing"):
        if transform.name in ("Activations", "Activationsd"):
            if transform.get("softmax"):
                return "softmax"
            if transform.get("sigmoid"):
                return "sigmoid"
    assumed = "sigmoid" if channels == 1 else "softmax"
    warnings.append(f"The bundle's postprocessing has no Activations(d): assumed {assumed} on its {channels} output "
                    "channel(s).")
    return assumed


def _monai_network(target: str) -> str | None:
    """``monai.networks.nets.<Name>`` for a MONAI network target (short, full or module path), else None."""
    if "." not in target:
        return f"monai.networks.nets.{target}"
    if target.startswith("monai.networks.nets."):
        return f"monai.networks.nets.{target.rsplit('.', 1)[1]}"
    return None


def _network(config: _Config) -> tuple[dict, Callable[[], nn.Module]]:
    item, raw = config.follow("network_def")
    if not isinstance(raw, dict) or not isinstance(raw.get("_target_"), str):
        raise ModelError(f"Bundle {config.folder}: {config.file.name} has no 'network_def' with a '_target_', so "
                         "the network of models/model.pt is unknown. Add it, or ship models/model.ts (TorchScript).")
    target = raw["_target_"]
    name = _monai_network(target)
    args = {k: v for k, v in raw.items() if not k.startswith("_")}
    if config.trust_code:
        def build() -> nn.Module:
            module = config.parser.get_parsed_content(item)
            if not isinstance(module, nn.Module):
                raise ModelError(f"Bundle {config.folder}: network_def builds a {type(module).__name__}, not a "
                                 "network (torch.nn.Module). Fix the bundle's config.")
            return module

        return {"name": name or target, "params": args, "built_by": "monai.bundle.ConfigParser (trusted)"}, build
    if name is None:
        raise ModelError(f"Bundle {config.folder}: network_def's _target_ {target!r} is not a MONAI network, and "
                         "building it would run the bundle's or another package's code. Pass --trust-bundle-code "
                         "(trust_code=True) if you trust the bundle's author.")
    params = config.resolve(args, item)
    return {"name": name, "params": params}, lambda: build_architecture(name, params)


def _first(section: Any, what: str, folder: Path) -> tuple[str, dict]:
    if not isinstance(section, dict) or not section:
        return ("image", {}) if what == "inputs" else ("pred", {})
    key, spec = next(iter(section.items()))
    if not isinstance(spec, dict):
        raise ModelError(f"Bundle {folder}: metadata.json network_data_format.{what}.{key} must be an object.")
    return key, spec


def _class_names(output: dict, folder: Path) -> list[str]:
    channel_def = output.get("channel_def")
    if isinstance(channel_def, dict) and channel_def:
        try:
            return [str(channel_def[k]) for k in sorted(channel_def, key=int)]
        except ValueError:
            raise ModelError(f"Bundle {folder}: metadata.json channel_def keys must be channel numbers, got "
                             f"{list(channel_def)}.") from None
    channels = output.get("num_channels")
    if isinstance(channels, int) and channels > 0:
        return [str(i) for i in range(channels)]
    raise ModelError(f"Bundle {folder}: metadata.json network_data_format.outputs gives neither num_channels nor "
                     "channel_def, so the classes are unknown. Add them.")


def _patch(config: _Config, image: dict) -> list[int] | None:
    for inferer in config.entries("inferer"):
        roi = inferer.get("roi_size")
        if isinstance(roi, list) and len(roi) == 3 and all(isinstance(v, int) and v > 0 for v in roi):
            return roi
        if inferer.name == "SimpleInferer":
            return None
    shape = image.get("spatial_shape")
    if isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape):
        return shape
    return None


def read_bundle(folder: str | Path, trust_code: bool = False) -> Bundle:
    """Read the MONAI bundle in ``folder`` into a model card (see the module docstring for what is read).

    Raises :class:`ModelError` naming the file and entry for anything CTXAI cannot map, and for ``$`` expressions
    unless ``trust_code``. Nothing from the bundle is run here except, trusted, its expressions."""
    folder = Path(folder).resolve()
    configs = folder / "configs"
    if not (configs / "metadata.json").is_file():
        raise ModelError(f"{folder} is a directory, not a model file or a MONAI bundle (no configs/metadata.json). "
                         "Give a model card (.json), a weights file, a bundle folder or an nnU-Net results folder.")
    config_file = next((configs / n for n in _CONFIGS if (configs / n).is_file()), None)
    if config_file is None:
        raise ModelError(f"Bundle {folder} has no configs/inference.json (or .yaml), which says how the model is "
                         "built and fed. Add it.")
    weights = next(((name, fmt) for name, fmt in _WEIGHTS if (folder / "models" / name).is_file()), None)
    if weights is None:
        raise ModelError(f"Bundle {folder} has no models/model.pt (state_dict) or models/model.ts (TorchScript). "
                         "Put the trained weights there.")
    try:
        import monai  # noqa: F401
    except ImportError:
        raise ModelError(f"{folder} is a MONAI bundle, and reading it needs MONAI. Install it with "
                         "`pip install monai`.") from None
    metadata = _read(configs / "metadata.json", folder)
    config = _Config(folder, config_file, _read(config_file, folder), metadata, trust_code)
    data_format = metadata.get("network_data_format") or {}
    image_key, image = _first(data_format.get("inputs"), "inputs", folder)
    _, output = _first(data_format.get("outputs"), "outputs", folder)
    class_names = _class_names(output, folder)
    warnings: list[str] = []
    normalization, spacing = _preprocessing(config, image_key, warnings)
    card = {
        "name": str(metadata.get("name") or folder.name),
        "version": metadata.get("version"),
        "description": f"MONAI bundle {folder.name}" + (f": {metadata['description']}"
                                                        if isinstance(metadata.get("description"), str) else ""),
        "task": "segmentation" if output.get("type") == "image" else "classification",
        "class_names": class_names,
        "input_channels": image.get("num_channels", 1),
        "patch_size": _patch(config, image),
        "spacing_mm": list(spacing) if spacing else None,
        "normalization": normalization.to_dict(),
        "output_activation": _activation(config, len(class_names), warnings),
        "format": weights[1],
        "weights": f"../models/{weights[0]}",
        "training": {"monai_bundle": {"folder": str(folder), "config": config_file.name,
                                      "trusted_code": trust_code}},
    }
    build = None
    if weights[1] == "state_dict":
        card["architecture"], build = _network(config)
    return Bundle(folder, ModelCard.from_dict(card, configs / "metadata.json"), build, warnings)
