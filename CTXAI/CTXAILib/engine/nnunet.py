"""nnU-Net v2 results folders as models: ``nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION``.

What nnU-Net's own inference does is reproduced from the folder's ``dataset.json`` and ``plans.json`` into a model
card synthesised in memory (and recorded with every run), and the network is built by nnU-Net's own code
(``PlansManager``, ``get_network_from_plans``: dynamic-network-architectures), deep supervision off:

- **normalisation** of the configuration's scheme: ``CTNormalization`` clips to the foreground's 0.5 and 99.5
  percentiles and z-scores with the foreground mean and standard deviation, all from the plans'
  ``foreground_intensity_properties_per_channel`` (the card's ``percentile`` with a fixed ``clip``, ``mean`` and
  ``std``); ``ZScoreNormalization`` z-scores each image with its own statistics (``percentile`` over [0, 100]);
  ``NoNormalization`` is ``none``;
- **patch size** and **target spacing** of the configuration; the card sets ``resample_to_spacing``, so inputs are
  resampled to that spacing and the maps come back on the input's grid (:mod:`.resample`), said in each run;
- **labels**: softmax over the labels in their order, or, for region-based training, a sigmoid per region;
- **folds**: ``fold_N/checkpoint_final.pth``, one fold, or every fold as an ensemble whose maps are averaged.
  Explanations run without nnU-Net's test-time mirroring (its prediction averages mirrored copies).

Checkpoints are read with ``torch.load(weights_only=True)``, with numpy's scalar and dtype reconstructors allowed
(nnU-Net's training log holds numpy numbers; they rebuild plain values, never run code). Anything else a checkpoint
holds is refused with the way to export its weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import ModelError
from .modelcard import ModelCard, Normalization
from .files import check_archive, sha256_file

__all__ = ["read_results_folder", "Member", "NORMALIZATIONS"]

CHECKPOINT = "checkpoint_final.pth"


class Member(NamedTuple):
    """One fold: its network (eval mode, weights loaded), its synthesised card and its checkpoint's sha256."""

    module: torch.nn.Module
    card: ModelCard
    sha256: str
_MIRRORING = "off (nnU-Net's own prediction averages mirrored copies; an explanation explains the network once)"


def _ct(properties: dict[str, Any], where: str) -> Normalization:
    try:
        lo, hi = float(properties["percentile_00_5"]), float(properties["percentile_99_5"])
        mean, std = float(properties["mean"]), float(properties["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where}: CTNormalization needs the foreground's percentile_00_5, percentile_99_5, mean "
                         f"and std in 'foreground_intensity_properties_per_channel' ({exc}). Re-run nnU-Net's "
                         "planning for this dataset.") from None
    return Normalization("percentile", percentiles=(0.5, 99.5), clip=(lo, hi), mean=mean, std=max(std, 1e-8))


# nnU-Net's normalisation scheme -> the card's normalisation, given the channel's foreground statistics.
NORMALIZATIONS = {
    "CTNormalization": _ct,
    # Clipping to the volume's own 0th and 100th percentiles changes nothing: the per-image z-score.
    "ZScoreNormalization": lambda properties, where: Normalization("percentile", percentiles=(0.0, 100.0)),
    "NoNormalization": lambda properties, where: Normalization(),
}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path.parent} is not an nnU-Net v2 results folder: it has no {path.name}. Give the "
                         "folder nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION (it holds dataset.json, "
                         "plans.json and fold_N/).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}). Restore it from the training run.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _folds(folder: Path, fold: int | str | None) -> list[Path]:
    """The checkpoints to load: the asked fold's, every fold's for ``"all"``, else the only one or fold 0's."""
    available = sorted((p for p in folder.glob("fold_*") if (p / CHECKPOINT).is_file()),
                       key=lambda p: (not p.name[5:].isdigit(), int(p.name[5:]) if p.name[5:].isdigit() else 0))
    names = ", ".join(p.name[5:] for p in available) or "none"
    if not available:
        raise ModelError(f"nnU-Net results folder {folder} has no fold_N/{CHECKPOINT} (training not finished?). "
                         "Finish the training or copy the folds' final checkpoints into the folder.")
    if fold is None:
        chosen = available if len(available) == 1 else [p for p in available if p.name == "fold_0"]
        if not chosen:
            raise ModelError(f"nnU-Net results folder {folder} has several folds ({names}) and no fold 0: choose "
                             "one with --fold N, or --fold all for their ensemble.")
        return chosen
    if str(fold) == "all":  # the numbered folds (nnU-Net's fold_all, trained on every case, is no fold of them)
        numbered = [p for p in available if p.name[5:].isdigit()]
        if not numbered:
            raise ModelError(f"nnU-Net results folder {folder} has no numbered fold_N/{CHECKPOINT} to ensemble "
                             f"(its folds: {names}).")
        return numbered
    wanted = folder / f"fold_{fold}"
    if wanted not in available:
        raise ModelError(f"nnU-Net results folder {folder} has no fold {fold} with a {CHECKPOINT}; its folds are "
                         f"{names}. Give one of them, or --fold all.")
    return [wanted]


def _allowed_globals() -> list:
    scalar = getattr(getattr(np, "_core", np.core), "multiarray").scalar
    return [scalar, np.dtype] + [type(np.dtype(kind)) for kind in ("f4", "f8", "i4", "i8", "u1", "b1")]


def _checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    check_archive(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors, truncated archives, foreign formats
        try:
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in _allowed_globals()}
            refused = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                       if name not in allowed]
        except Exception:  # noqa: BLE001 - not a readable archive at all: report the load's own error
            refused = []
        if not refused:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"Could not read nnU-Net checkpoint {path}: {first}. Copy the file again from the "
                             "training run.") from None
        raise ModelError(
            f"nnU-Net checkpoint {path} holds Python objects that weights-only loading refuses "
            f"({', '.join(refused)}); CTXAI never unpickles them, because untrusted code could run. If you trust "
            "the file, keep its weights only: rename it to checkpoint_final.orig.pth and run python -c \"import "
            "torch; c = torch.load('checkpoint_final.orig.pth', weights_only=False); torch.save({'network_weights': "
            f"c['network_weights']}}, '{CHECKPOINT}')\" in {path.parent}.") from None
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ModelError(f"nnU-Net checkpoint {path} has no 'network_weights' (a mapping of names to tensors). "
                         "Is it a checkpoint written by nnU-Net v2's trainer?")
    return weights


def _labels(label_manager: Any, dataset: dict[str, Any]) -> tuple[list[str], str]:
    """Class names, one per output channel, and the activation nnU-Net applies."""
    labels = dataset.get("labels", {})
    if label_manager.has_regions:
        by_region = {tuple(np.atleast_1d(v).tolist()): k for k, v in labels.items()}
        names = [by_region.get(tuple(np.atleast_1d(r).tolist()), f"region {list(np.atleast_1d(r))}")
                 for r in label_manager.foreground_regions]
        return names, "sigmoid"
    by_value = {int(v): k for k, v in labels.items() if isinstance(v, int)}
    return [by_value.get(int(v), str(v)) for v in label_manager.all_labels], "softmax"


def _permuted(values: Any, transpose_forward: list[int]) -> list[float]:
    """nnU-Net's (transposed) per-axis values in array order (k, j, i) -> the card's order (i, j, k)."""
    kji = [0.0] * 3
    for axis, value in zip(transpose_forward, values):
        kji[axis] = value
    return list(reversed(kji))


def _register_once(network: torch.nn.Module) -> None:
    """dynamic-network-architectures registers each conv block's layers twice, by name (``conv``, ``norm``,
    ``nonlin``) and inside ``all_modules``, the sequence its forward runs; hooks placed per registration then fire
    twice (Captum's DeepLIFT fails on it). Only the registration forward runs is kept; the decoder's second
    registration of the encoder (used for memory estimates only) goes too."""
    for module in list(network.modules()):
        runs = module._modules.get("all_modules")
        if isinstance(runs, torch.nn.Sequential):
            inside = {id(layer) for layer in runs}
            for name in [n for n, child in module.named_children() if n != "all_modules" and id(child) in inside]:
                delattr(module, name)
    seen: set[int] = set()
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if id(child) in seen:
                delattr(module, name)
            seen.add(id(child))


def read_results_folder(folder: str | Path, fold: int | str | None = None
                        ) -> tuple[list[Member], tuple[ModelCard, str] | None, list[str]]:
    """The folds of an nnU-Net v2 results folder (``fold`` as in :func:`CTXAILib.engine.models.load_model`), the
    ensemble's card and digest when several are asked for (else None), and what every run should say about them.
    :func:`~CTXAILib.engine.models.load_model` makes them a model."""
    folder = Path(folder).resolve()
    dataset, plans = _json(folder / "dataset.json"), _json(folder / "plans.json")
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise ModelError(f"{folder} is not named TRAINER__PLANS__CONFIGURATION as nnU-Net names its results "
                         "folders (e.g. nnUNetTrainer__nnUNetPlans__3d_fullres). Give that folder.")
    trainer, plans_name, configuration = parts
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError as exc:
        raise ModelError(f"Loading the nnU-Net results folder {folder} needs nnunetv2 ({exc}). Install it: pip "
                         "install 'ctxai[nnunet]'.") from None
    manager = PlansManager(plans)
    if configuration not in manager.available_configurations:
        raise ModelError(f"{folder / 'plans.json'} has no configuration {configuration!r} (it has "
                         f"{', '.join(manager.available_configurations)}). Give the results folder of one of those.")
    config = manager.get_configuration(configuration)
    if len(config.patch_size) != 3:
        raise ModelError(f"nnU-Net configuration {configuration!r} of {folder} is 2-D; CTXAI explains 3-D models. "
                         "Use the dataset's 3d_fullres (or 3d_lowres) results.")
    if list(manager.transpose_forward) != [0, 1, 2]:
        raise ModelError(f"{folder / 'plans.json'} transposes the axes ({manager.transpose_forward}) before its "
                         "network, which CTXAI does not do yet. Plan the dataset with its axes kept "
                         "(transpose_forward [0, 1, 2]) or explain another configuration.")
    if config.previous_stage_name is not None:
        raise ModelError(f"nnU-Net configuration {configuration!r} is a cascade stage that also reads the "
                         f"segmentation of {config.previous_stage_name!r}; CTXAI explains single-stage "
                         "configurations (3d_fullres, 3d_lowres).")
    channels = len(dataset.get("channel_names", dataset.get("modality", {}))) or 1
    schemes = list(config.normalization_schemes)
    properties = plans.get("foreground_intensity_properties_per_channel", {})
    normalizations = []
    for index, scheme in enumerate(schemes):
        if scheme not in NORMALIZATIONS:
            raise ModelError(f"nnU-Net normalisation {scheme} of {folder / 'plans.json'} has no CTXAI equivalent "
                             f"(supported: {', '.join(NORMALIZATIONS)}).")
        normalizations.append(NORMALIZATIONS[scheme](properties.get(str(index), {}), str(folder / "plans.json")))
    if len(set(normalizations)) > 1:
        raise ModelError(f"{folder} normalises its {channels} input channels differently ({', '.join(schemes)}); "
                         "CTXAI applies one normalisation to every channel. Explain a one-channel model.")
    label_manager = manager.get_label_manager(dataset)
    class_names, activation = _labels(label_manager, dataset)
    checkpoints = _folds(folder, fold)

    arch_kwargs = dict(config.network_arch_init_kwargs)
    if isinstance(arch_kwargs.get("nonlin_kwargs"), dict) and arch_kwargs["nonlin_kwargs"].get("inplace"):
        # In-place activations overwrite the tensors that hooks read (Captum's DeepLIFT refuses them); the
        # network computes the same without them.
        arch_kwargs["nonlin_kwargs"] = {**arch_kwargs["nonlin_kwargs"], "inplace": False}

    def build() -> torch.nn.Module:
        return get_network_from_plans(config.network_arch_class_name, arch_kwargs,
                                      config.network_arch_init_kwargs_req_import, channels,
                                      label_manager.num_segmentation_heads, allow_init=False,
                                      deep_supervision=False)

    name = f"{manager.dataset_name} {configuration}"
    notes = [f"nnU-Net model {name} ({trainer}, {plans_name}): explained without test-time mirroring."]
    if any(getattr(config, "use_mask_for_norm", None) or []):
        notes.append(f"nnU-Net's {schemes[0]} of {folder.name} normalises inside the image's nonzero mask only "
                     "(use_mask_for_norm); CTXAI normalises the whole volume, so voxels outside it differ.")
    members = []
    for checkpoint_dir in checkpoints:
        path = checkpoint_dir / CHECKPOINT
        network = build()
        try:
            network.load_state_dict(_checkpoint_weights(path), strict=True)
        except RuntimeError as exc:
            detail = str(exc).split("\n", 1)[-1].strip()[:400]
            raise ModelError(f"The weights in {path} do not fit the network {folder / 'plans.json'} describes: "
                             f"{detail}. Use the plans.json the fold was trained with.") from None
        _register_once(network)
        card = ModelCard(
            name=f"{name} {checkpoint_dir.name}", task="segmentation", class_names=class_names, format="state_dict",
            weights=f"{checkpoint_dir.name}/{CHECKPOINT}", input_channels=channels,
            patch_size=tuple(int(v) for v in _permuted(config.patch_size, manager.transpose_forward)),
            spacing_mm=tuple(float(v) for v in _permuted(config.spacing, manager.transpose_forward)),
            resample_to_spacing=True, normalization=normalizations[0], output_activation=activation,
            architecture={"name": config.network_arch_class_name, "params": config.network_arch_init_kwargs},
            description=f"Synthesised by CTXAI from {folder} (dataset.json, plans.json) on loading; not a file.",
            training={"source": "nnU-Net v2 results folder", "folder": str(folder), "trainer": trainer,
                      "plans": plans_name, "configuration": configuration, "folds": [checkpoint_dir.name],
                      "normalization": schemes[0], "mirroring": _MIRRORING},
            path=folder / "ctxai-card.json")
        members.append(Member(network.eval(), card, sha256_file(path)))
    if len(members) == 1:
        return members, None, notes
    folds = [p.name for p in checkpoints]
    card = members[0].card
    card = ModelCard(**{**card.__dict__, "name": f"{name} {'+'.join(folds)}", "weights": f"{folds[0]}/{CHECKPOINT}",
                        "training": {**card.training, "folds": folds, "ensemble": "mean of the folds' maps"}})
    digest = hashlib.sha256("".join(member.sha256 for member in members).encode()).hexdigest()
    return members, (card, digest), notes
