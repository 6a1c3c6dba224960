"""Loading models safely, and discovering their layers.

A model is a weights file plus a model card (see :mod:`.modelcard`). TorchScript archives are loaded with
``torch.jit.load`` (compiled code, no Python pickle); state_dicts with ``torch.load(weights_only=True)`` into an
architecture the card names, so no untrusted pickle ever runs. A bare TorchScript file without a card still works:
the task is inferred from the output shape, with a warning saying what was assumed. A TorchScript model is run
through its eager twin (:mod:`.scripted`) when one reproduces it, so that layer methods can hook its layers.

An output that is already a probability (every value in [0, 1], or channels summing to 1) must not be activated a
second time: a bare model with such output gets no activation assumed, and a card that names one is refused when
the first tile of a real volume confirms what the load-time probes showed (:meth:`LoadedModel.check_activation`).
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerError, ModelError
from .bundles import read_bundle
from .files import check_archive, regular_file, sha256_file
from .modelcard import ModelCard
from .networks import build_architecture
from .scripted import EagerTwin, eager_twin

__all__ = ["LayerInfo", "LoadedModel", "load_model", "sha256_file", "find_card", "activated_kind"]

# Module types whose output is a spatial feature map a CAM can weight.
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_NAMES = frozenset(t.__name__ for t in _CONV_TYPES)  # a scripted module keeps its class name only


@dataclass(frozen=True)
class LayerInfo:
    """A named module, its type and the shape of its output for one patch (None when it cannot be hooked)."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    is_conv: bool

    @property
    def spatial(self) -> bool:
        """True when the output is a 3-D feature map (N, C, D, H, W), the only kind a CAM can use."""
        return self.output_shape is not None and len(self.output_shape) == 5


def _type_name(module: nn.Module) -> str:
    # The modules of a TorchScript model's eager twin that stand for the network's own classes carry their names.
    return getattr(module, "original_name", type(module).__name__)


def activated_kind(output: torch.Tensor, tolerance: float = 1e-3) -> str | None:
    """What an output (N, C, ...) looks like: ``"softmax"`` when its C > 1 channels are non-negative and sum to 1
    (within ``tolerance``) everywhere, ``"sigmoid"`` when every value lies in [0, 1], None for logits."""
    output = output.detach().float()
    if output.numel() == 0 or not torch.isfinite(output).all():
        return None
    low, high = float(output.min()), float(output.max())
    if output.shape[1] > 1 and low >= -tolerance and float((output.sum(1) - 1.0).abs().max()) <= tolerance:
        return "softmax"
    return "sigmoid" if low >= 0.0 and high <= 1.0 else None


def _probe_inputs(channels: int, shape: tuple[int, ...], device: torch.device | str) -> list[torch.Tensor]:
    """A zero patch and a seeded uniform [0, 1] one: a logit model leaves [0, 1] on at least one of them, while a
    constant input alone can keep a logit output inside it."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((1, channels) + tuple(shape), generator=generator)
    return [torch.zeros((1, channels) + tuple(shape), device=device), noise.to(device)]


def _describe_output(output: torch.Tensor) -> str:
    output = output.detach().float()
    return f"values {float(output.min()):.3g} to {float(output.max()):.3g}"



def find_card(weights: Path) -> Path | None:
    """The card beside a weights file: ``model.json`` or ``model.card.json`` for ``model.pt``."""
    for candidate in (weights.with_suffix(".json"), weights.with_suffix(".card.json")):
        if candidate.exists():
            return candidate
    return None


def _is_torchscript(path: Path) -> bool:
    # Both torch.save and TorchScript write zip archives; only TorchScript stores compiled code under code/.
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


class LoadedModel:
    """A model ready to run: module in eval mode on its device, its card and the digest of its weights.

    >>> from CTXAILib.networks import DefectClassifier3D
    >>> card = ModelCard.from_dict({"name": "demo", "task": "classification", "class_names": ["a", "b"],
    ...     "format": "state_dict", "weights": "-", "patch_size": [16, 16, 16],
    ...     "architecture": {"name": "ctxai.DefectClassifier3D", "params": {"num_classes": 2}}})
    >>> model = LoadedModel(DefectClassifier3D(num_classes=2), card, sha256="0" * 64)
    >>> model.default_layer()
    'features.block4.conv2'
    """

    def __init__(self, module: nn.Module, card: ModelCard, sha256: str, device: torch.device | str = "cpu",
                 warnings_: list[str] | None = None, members: list[LoadedModel] | None = None,
                 assumed_activation: bool = False):
        self.card = card
        self._torchscript = isinstance(module, torch.jit.ScriptModule)
        self.twin: EagerTwin | None = None
        if self._torchscript:
            generator = torch.Generator().manual_seed(0)
            probe = torch.randn((1, card.input_channels) + self.probe_shape(), generator=generator)
            self.twin = eager_twin(module.eval(), probe)
            module = self.twin.module or module
        self.module = module.eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)  # attributions need input gradients only; this halves backward work
        self.sha256 = sha256
        self.warnings = list(warnings_ or [])
        # An ensemble (an nnU-Net's folds): ``module`` is the first member's network, for layers and the output check;
        # the explainer explains with each member and averages their maps.
        self.members = list(members or [])
        self.device = torch.device("cpu")
        self._layers: dict[tuple, list[LayerInfo]] = {}
        self._output_checked = False
        # What the load-time probes' raw outputs looked like (see activated_kind); the first real tile confirms it.
        self.probe_kind: str | None = None
        self.assumed_activation = assumed_activation  # a bare model: the card's activation is a guess
        self._activation_checked = False
        self.to(device)

    @property
    def is_torchscript(self) -> bool:
        """Whether the file is TorchScript (run through its eager twin when it has one)."""
        return self._torchscript

    @property
    def hookable(self) -> bool:
        """Whether layer methods can hook the model's layers: Python modules, or a TorchScript model's eager twin."""
        return not isinstance(self.module, torch.jit.ScriptModule)

    def layer_access(self) -> str:
        """How layer methods reach the model's layers, in words (for ``ctxai layers``, the panel and the record)."""
        if not self._torchscript:
            return "Python modules"
        if self.hookable:
            return (f"rebuilt from TorchScript as Python modules (largest difference from the compiled model on a "
                    f"random probe: {self.twin.max_difference:.3g})")
        return self.hook_refusal()

    def hook_refusal(self) -> str | None:
        """Why layer methods cannot run on this model and which methods can; None when they can."""
        if self.hookable:
            return None
        from .methods import list_methods

        specs = [spec for spec in list_methods() if spec.family != "prediction"]
        hooked = ", ".join(spec.label for spec in specs if spec.needs_hooks)
        others = ", ".join(spec.label for spec in specs if not spec.needs_hooks)
        return (f"Model {self.card.name!r} is TorchScript and CTXAI could not rebuild its layers as Python modules: "
                f"{self.twin.reason}. Layer methods ({hooked}) need such modules to hook and do not work on it; "
                f"{others} do. For layer methods, give a state_dict with its architecture in the model card.")

    def to(self, device: torch.device | str) -> LoadedModel:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def probe_shape(self) -> tuple[int, int, int]:
        """A (k, j, i) input shape to probe the model with: its patch, or 32³ when it takes any size."""
        return self.card.patch_shape or (32, 32, 32)

    def check_output(self) -> None:
        """Run the model once on a zero patch and once on a noise patch, so that a 2-D model, one that fails on the
        card's input, one whose output does not fit the card's task or whose channels are not one per class name
        is refused here, in words, rather than deep inside a method (or with an IndexError after a whole-volume
        prediction). Also notes whether the output is already a probability (see :meth:`check_activation`)."""
        if self._output_checked:
            return
        shape = self.probe_shape()
        outputs = []
        for x in _probe_inputs(self.card.input_channels, shape, self.device):
            try:
                with torch.no_grad():
                    output = self.module(x)
            except Exception as exc:  # noqa: BLE001 - whatever the model raises, the analyst needs the cause in words
                raise _run_failure(self.module, exc, x, f"Model {self.card.name!r}") from None
            task = self.card.task
            fits = isinstance(output, torch.Tensor) and (
                output.ndim == 2 if task == "classification" else output.ndim == 5 and tuple(output.shape[2:]) == shape)
            if not fits:
                got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ModelError(f"Model {self.card.name!r} returns {got} for a {tuple(x.shape)} input, which does "
                                 f"not fit the task {task!r} of its card (a classifier returns (N, classes), a "
                                 "segmentation model (N, classes, D, H, W) on the input's grid). Fix 'task' in "
                                 f"{self.card.path}.")
            outputs.append(output)
        names = self.card.class_names
        if outputs[0].shape[1] != len(names):
            raise ModelError(f"Model {self.card.name!r} has {outputs[0].shape[1]} output channel(s) but its card "
                             f"names {len(names)} class(es) ({', '.join(names)}). Give 'class_names' one name per "
                             f"output channel, in channel order, in {self.card.path}.")
        kinds = {activated_kind(output) for output in outputs}
        self.probe_kind = kinds.pop() if len(kinds) == 1 else None
        self._output_checked = True

    def check_activation(self, output: torch.Tensor, where: str) -> None:
        """Refuse a second activation, on the raw output of the first real input (``where`` names it): when both
        the load-time probes and this output are already probabilities, a card's sigmoid or softmax would squash
        them (a sigmoid maps [0, 1] to 0.50-0.73, every voxel above 0.5: all predicted). A bare model assumed to
        output probabilities is refused when this output turns out to be logits."""
        if self._activation_checked:
            return
        self._activation_checked = True
        kind, activation = activated_kind(output), self.card.output_activation
        if activation != "none" and kind is not None and self.probe_kind is not None:
            what = "its channels sum to 1" if kind == "softmax" else "every value lies in [0, 1]"
            fix = (f"Write a model card beside {self.card.weights_path.name} with \"output_activation\": \"none\""
                   if self.assumed_activation else f"Set \"output_activation\": \"none\" in {self.card.path}")
            raise ModelError(f"Model {self.card.name!r} already outputs probabilities: on load-time probes and on "
                             f"{where} {what} ({_describe_output(output)}), so the {activation} "
                             f"{'assumed for it' if self.assumed_activation else 'its card names'} would be a "
                             f"second activation (squashing them and predicting every voxel). {fix}.")
        if activation == "none" and self.assumed_activation and kind is None:
            raise ModelError(f"Model {self.card.name!r} has no model card and looked like it outputs probabilities "
                             f"on load-time probes, so no activation was assumed, but on {where} it outputs "
                             f"logits ({_describe_output(output)}). Write a model card beside "
                             f"{self.card.weights_path.name} naming its output_activation (sigmoid or softmax).")

    def layers(self, spatial_shape: tuple[int, int, int] | None = None) -> list[LayerInfo]:
        """Every named sub-module in execution order, with output shapes for one input of ``spatial_shape``."""
        shape = tuple(spatial_shape or self.probe_shape())
        if shape in self._layers:
            return self._layers[shape]
        named = [(name, module) for name, module in self.module.named_modules() if name]
        if not self.hookable:
            # Compiled modules run their graph in C++: Python forward hooks never fire, so no shapes.
            infos = [LayerInfo(name, m.original_name, None, m.original_name in _CONV_NAMES) for name, m in named]
        else:
            shapes: dict[str, tuple[int, ...]] = {}
            order: list[str] = []

            def recorder(name: str):
                def hook(_module, _inputs, output):
                    if isinstance(output, torch.Tensor) and name not in shapes:
                        shapes[name] = tuple(output.shape)
                        order.append(name)
                return hook

            handles = [module.register_forward_hook(recorder(name)) for name, module in named]
            try:
                with torch.no_grad():
                    self.module(torch.zeros((1, self.card.input_channels) + shape, device=self.device))
            finally:
                for handle in handles:
                    handle.remove()
            modules = dict(named)
            infos = [LayerInfo(n, _type_name(modules[n]), shapes[n], isinstance(modules[n], _CONV_TYPES))
                     for n in order]
            infos += [LayerInfo(n, _type_name(m), None, isinstance(m, _CONV_TYPES))
                      for n, m in named if n not in shapes]
        self._layers[shape] = infos
        return infos

    def default_layer(self) -> str | None:
        """The card's CAM layer, else the last convolution (before the output head for segmentation); None when
        layer methods cannot run on the model (see :meth:`hook_refusal`)."""
        if not self.hookable:
            return None
        if self.card.default_cam_layer:
            return self.card.default_cam_layer
        convs = [info for info in self.layers() if info.is_conv and info.spatial]
        if self.card.task == "segmentation":
            # The last conv of a segmentation net maps features to class logits; its CAM is the prediction itself.
            convs = [info for info in convs if info.output_shape[1] != len(self.card.class_names)] or convs
        return convs[-1].name if convs else None

    def get_layer(self, name: str | None) -> nn.Module:
        """The module named ``name`` (the default CAM layer when None); raises LayerError with suggestions."""
        import difflib

        if not self.hookable:
            raise LayerError(self.hook_refusal())
        name = name or self.default_layer()
        modules = dict(self.module.named_modules())
        if not name or name not in modules:
            spatial = [info.name for info in self.layers() if info.spatial]
            close = difflib.get_close_matches(name or "", spatial, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise LayerError(f"Model {self.card.name!r} has no layer {name!r}.{hint} Layers with 3-D feature maps: "
                             f"{', '.join(spatial) or 'none'} (list them with `ctxai layers --model ...`).")
        return modules[name]


def load_model(path: str | Path, device: torch.device | str = "cpu", trust_code: bool = False,
               fold: int | str | None = None) -> LoadedModel:
    """Load a model from its card (``.json``), its weights file (card found beside it, if any), a MONAI bundle
    folder (:mod:`.bundles`; ``trust_code`` lets the Python expressions of its config run) or an nnU-Net v2 results
    folder (:mod:`.nnunet`; ``fold``: a number, ``"all"`` for the fold ensemble, None for the only fold or fold 0).

    Raises :class:`ModelError` for a missing, corrupt or mismatching file, with what to do about it.
    """
    if Path(path).is_dir() and (Path(path) / "plans.json").is_file():
        from .nnunet import read_results_folder

        folds, ensemble, notes = read_results_folder(path, fold)
        members = [LoadedModel(member.module, member.card, member.sha256, device, notes) for member in folds]
        if ensemble is None:
            return members[0]
        return LoadedModel(members[0].module, ensemble[0], ensemble[1], device, notes, members=members)
    if fold is not None:
        raise ModelError(f"A fold ({fold}) was given, but {path} is not an nnU-Net results folder (no plans.json). "
                         "Leave the fold out, or give the folder TRAINER__PLANS__CONFIG.")
    bundle = read_bundle(path, trust_code) if Path(path).is_dir() else None
    if bundle is not None:
        card = bundle.card
        weights = regular_file(card.weights_path, "Weights file", ModelError)
    elif (path := regular_file(path, "Model file", ModelError)).suffix.lower() == ".json":
        card = ModelCard.load(path)
        weights = card.weights_path
        if not weights.exists():
            raise ModelError(f"Model card {path} points to weights {weights}, which do not exist. Put the weights "
                             "beside the card or fix 'weights' in the card.")
        regular_file(weights, "Weights file", ModelError)
    else:
        weights = path
        card_path = find_card(path)
        card = ModelCard.load(card_path) if card_path else None

    digest = sha256_file(weights)
    check_archive(weights)
    if card is not None and card.sha256 and card.sha256 != digest:
        raise ModelError(f"Weights {weights} do not match their model card: sha256 is {digest}, the card says "
                         f"{card.sha256}. The file is corrupt or was replaced; restore it, or update 'sha256' in "
                         "the card if the new weights are intended.")
    if card is None:
        return _load_bare_torchscript(weights, digest, device)
    if card.format == "torchscript":
        module = _jit_load(weights)
    else:
        module = (bundle.build() if bundle is not None else
                  build_architecture(card.architecture["name"], card.architecture.get("params")))
        state = _load_state_dict(weights)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = str(exc).split("\n", 1)[-1].strip()[:400]
            raise ModelError(f"Weights {weights} do not fit architecture {card.architecture['name']} with params "
                             f"{card.architecture.get('params', {})}: {detail}. Fix 'architecture' in the card "
                             "or use the matching weights.") from exc
    return LoadedModel(module, card, digest, device, bundle.warnings if bundle is not None else None)


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    if not _is_torchscript(path):
        raise ModelError(f"{path} is not a TorchScript archive (a state_dict or another format?). Save the model "
                         "with torch.jit.save, or describe the state_dict in a model card with format 'state_dict'.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises several types for damaged archives
        raise ModelError(f"Could not load TorchScript model {path}: {str(exc).strip().splitlines()[0]}. The file "
                         "is damaged or was written by a newer PyTorch; re-export it.") from exc


def _load_state_dict(path: Path) -> dict:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated archives, foreign formats
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"Could not load state_dict {path} safely: {first}. The file is damaged, or it holds "
                         "pickled Python objects beyond tensors (refused: untrusted code could run); save the "
                         "model with torch.save(model.state_dict(), path).") from exc
    # Training checkpoints (MONAI's CheckpointSaver among them) keep the weights under one key.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state_dict (a mapping of names to tensors). Save it with "
                         "torch.save(model.state_dict(), path).")
    return state


def _run_failure(module: nn.Module, exc: BaseException, x: torch.Tensor, what: str) -> ModelError:
    """The error to report when ``module`` fails on the 5-D probe ``x``: a 2-D model is named as such, because
    TorchScript buries that cause under "operation failed in the TorchScript interpreter"."""
    try:
        with torch.no_grad():
            module(x[:, :, 0])
    except Exception:  # noqa: BLE001 - not a 2-D model either: report the original failure
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        cause = lines[-1] if lines else type(exc).__name__  # TorchScript puts the real cause last
        return ModelError(f"{what} fails on a {tuple(x.shape)} input: {cause}. Give input_channels and patch_size "
                          "that fit the model in its model card.")
    return ModelError(f"{what} expects 2-D input (N, C, H, W); CTXAI explains 3-D models (N, C, D, H, W). Use "
                      "a 3-D model.")


def _load_bare_torchscript(path: Path, digest: str, device: torch.device | str) -> LoadedModel:
    module = _jit_load(path)
    outputs = []
    for probe in _probe_inputs(1, (32, 32, 32), "cpu"):
        try:
            with torch.no_grad():
                output = module(probe)
        except Exception as exc:  # noqa: BLE001 - whatever the model raises, the analyst needs the cause in words
            raise _run_failure(module, exc, probe, f"{path} (no model card beside it, so 1 channel assumed)") from None
        if not isinstance(output, torch.Tensor) or output.ndim not in (2, 5):
            raise ModelError(f"{path} has no model card and its output {getattr(output, 'shape', type(output))} is "
                             "neither (N, classes) nor (N, classes, D, H, W). Write a model card beside it.")
        outputs.append(output)
    task = "classification" if output.ndim == 2 else "segmentation"
    classes = output.shape[1]
    kinds = {activated_kind(output) for output in outputs}
    if len(kinds) == 1 and None not in kinds:
        activation = "none"
        said = (f"no output activation (its output on probes is already a probability: "
                f"{'channels summing to 1' if kinds == {'softmax'} else 'values in [0, 1]'})")
    else:
        activation = "sigmoid" if classes == 1 else "softmax"
        said = f"{activation} output"
    card = ModelCard(name=path.stem, task=task, class_names=[str(i) for i in range(classes)], format="torchscript",
                     weights=path.name, output_activation=activation, path=path.with_suffix(".json"))
    # Said once, as the run's warning line: a Python warning as well would print it twice on the command line.
    message = (f"{path.name} has no model card: assumed a {task} model with {classes} classes numbered 0-"
               f"{classes - 1}, one input channel, {said}, no intensity normalisation and any input "
               "size. Write a model card beside it to state these.")
    return LoadedModel(module, card, digest, device, [message], assumed_activation=True)
