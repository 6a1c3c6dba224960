"""Quality of the bundled models on held-out phantoms, and where the bundled models live.

The figures written into the model cards and asserted by the tests come from here: the classifier's balanced
accuracy on defect-centred and defect-free patches, the U-Net's Dice and per-defect detection recall over whole
parts through the engine's own sliding window, and the strict pointing game of a map beside its trivial controls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import ModelError

__all__ = ["bundled_models_dir", "bundled_model", "classifier_quality", "segmentation_quality", "pointing_game",
           "MIN_DEFECT_VOXELS_ACROSS", "DETECTION_OVERLAP"]

MIN_DEFECT_VOXELS_ACROSS = 3.0
"""Detection recall counts defects whose equivalent-sphere diameter is at least this many voxels."""
DETECTION_OVERLAP = 0.25
"""A defect counts as detected when the predicted defect voxels cover at least this fraction of it."""


def bundled_models_dir() -> Path:
    """``$CTXAI_MODELS_DIR``, else ``Resources/Models`` of the source tree, else of the installed Slicer module."""
    if os.environ.get("CTXAI_MODELS_DIR"):
        return Path(os.environ["CTXAI_MODELS_DIR"])
    here = Path(__file__).resolve()
    # CTXAILib/synthetic/ sits in CTXAI/ (the Slicer module folder), which sits in the repository.
    for candidate in (here.parents[3] / "Resources" / "Models", here.parents[2] / "Resources" / "Models"):
        if candidate.is_dir():
            return candidate
    return here.parents[3] / "Resources" / "Models"


def bundled_model(name: str) -> Path:
    """The card of a bundled model: ``classifier`` or ``unet``."""
    card = bundled_models_dir() / f"{name}.json"
    if not card.exists():
        raise ModelError(f"The bundled model {name!r} is missing ({card}). Restore Resources/Models from the "
                         f"repository or retrain it with `ctxai train {name}`.")
    return card


def _balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, classes: int) -> tuple[float, list[float]]:
    recalls = [float((predicted[truth == c] == c).mean()) for c in range(classes) if (truth == c).any()]
    return float(np.mean(recalls)), recalls


def classifier_quality(card: str | Path, seeds: Iterable[int]) -> dict:
    """Balanced accuracy of the classifier on patches of held-out phantoms (defects centred, plus as many
    defect-free patches), with per-class recall and the confusion matrix (rows: truth)."""
    import torch

    from ..engine.models import load_model
    from .dataset import CLASSIFIER_CLASSES, PHANTOM_SHAPE, SPACING_MM, classifier_patches
    from .phantom import generate_phantom

    model = load_model(card)
    truths, predictions = [], []
    for seed in seeds:
        phantom = generate_phantom(seed, PHANTOM_SHAPE, SPACING_MM)
        x, y = classifier_patches(phantom, np.random.default_rng(seed), jitter=0)
        with torch.no_grad():
            logits = model(torch.from_numpy(x.astype(np.float32))[:, None])
        truths.append(y)
        predictions.append(logits.argmax(1).numpy())
    truth, predicted = np.concatenate(truths), np.concatenate(predictions)
    n = len(CLASSIFIER_CLASSES)
    balanced, recalls = _balanced_accuracy(truth, predicted, n)
    confusion = np.zeros((n, n), int)
    np.add.at(confusion, (truth, predicted), 1)
    return {"balanced_accuracy": round(balanced, 4), "per_class_recall": dict(zip(CLASSIFIER_CLASSES,
                                                                               [round(r, 4) for r in recalls])),
            "confusion": confusion.tolist(), "patches": int(len(truth)), "held_out_seeds": _span(seeds)}


def segmentation_quality(card: str | Path, seeds: Iterable[int]) -> dict:
    """Foreground Dice (any defect class vs background, pooled over the parts), per-class Dice, and the recall
    of defects at least :data:`MIN_DEFECT_VOXELS_ACROSS` voxels across, through the engine's sliding window."""
    from ..engine.explain import Explainer
    from .dataset import PHANTOM_SHAPE, SEGMENTATION_CLASSES, SPACING_MM, segmentation_targets
    from .phantom import generate_phantom

    explainer = Explainer(card, device="auto")
    overlap = total = 0
    per_class = np.zeros((len(SEGMENTATION_CLASSES), 2))
    found = counted = 0
    for seed in seeds:
        phantom = generate_phantom(seed, PHANTOM_SHAPE, SPACING_MM)
        probabilities = explainer.segmentation_probabilities(explainer.prepare(phantom.ct))
        predicted = probabilities.argmax(axis=0)
        truth = segmentation_targets(phantom)
        overlap += int(((predicted > 0) & (truth > 0)).sum())
        total += int((predicted > 0).sum() + (truth > 0).sum())
        for c in range(1, len(SEGMENTATION_CLASSES)):
            per_class[c] += (((predicted == c) & (truth == c)).sum(), (predicted == c).sum() + (truth == c).sum())
        voxel = float(np.prod(phantom.ct.spacing) ** (1 / 3))
        for defect in phantom.defects:
            if defect.equivalent_diameter_mm / voxel < MIN_DEFECT_VOXELS_ACROSS:
                continue
            counted += 1
            members = phantom.instances.array == defect.id
            found += int((predicted[members] > 0).mean() >= DETECTION_OVERLAP)
    return {"dice": round(2 * overlap / max(total, 1), 4),
            "per_class_dice": {SEGMENTATION_CLASSES[c]: round(float(2 * per_class[c, 0] / max(per_class[c, 1], 1)), 4)
                               for c in range(1, len(SEGMENTATION_CLASSES))},
            "detection_recall": round(found / max(counted, 1), 4), "defects_counted": counted,
            "detection_rule": f"equivalent diameter >= {MIN_DEFECT_VOXELS_ACROSS:g} voxels; detected when "
                              f">= {DETECTION_OVERLAP:.0%} of its voxels are predicted as a defect",
            "held_out_seeds": _span(seeds)}


def pointing_game(card: str | Path, seeds: Iterable[int], method: str = "gradcam") -> dict:
    """The strict pointing game on the correctly classified defect patches of held-out phantoms: the share whose
    maximum of |map| lies inside the defect's mask grown by one voxel, beside the same score of two trivial
    controls, which a useful map must beat.

    The patches are centred on the defect, so the controls are: ``centre``, a map that peaks at the patch centre
    (a hit where the centre voxel is in the grown mask), and ``random``, a map whose maximum falls anywhere (its
    expected score, the grown mask's share of the patch, computed exactly).
    """
    from scipy import ndimage

    from ..engine.explain import Explainer
    from ..engine.geometry import Volume
    from .dataset import CLASSIFIER_PATCH, PHANTOM_SHAPE, SPACING_MM, TYPE_TO_CLASS, classifier_patches, crop_around
    from .phantom import generate_phantom

    explainer = Explainer(card, device="auto")
    hits, centre_hits, random_hits, layer = [], [], [], None
    centre = (CLASSIFIER_PATCH // 2,) * 3
    for seed in seeds:
        phantom = generate_phantom(seed, PHANTOM_SHAPE, SPACING_MM)
        x, _ = classifier_patches(phantom, np.random.default_rng(seed), jitter=0, normal_per_defect=0.0)
        for patch, defect in zip(x, phantom.defects):
            volume = Volume(patch.astype(np.float32) * 5000.0 - 1000.0, spacing=SPACING_MM)  # back to grey values
            result = explainer.explain(volume, method)
            if result.prediction["predicted_class"] != explainer.model.card.class_names[TYPE_TO_CLASS[defect.type]]:
                continue
            layer = result.layer
            # The same crop as the patch's (centred on the rounded centroid), then grown by one voxel every way.
            mask = crop_around(phantom.instances.array == defect.id, tuple(np.round(defect.centre).astype(int)),
                               CLASSIFIER_PATCH, False)
            grown = ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool))
            hits.append(grown.flat[np.argmax(np.abs(result.attribution.array))])
            centre_hits.append(grown[centre])
            random_hits.append(grown.mean())

    def share(values: list) -> float:
        return round(float(np.mean(values)), 4) if values else 0.0

    return {"pointing_game": share(hits), "controls": {"centre": share(centre_hits), "random": share(random_hits)},
            "patches": len(hits), "hit": "argmax of |map| inside the defect mask grown by 1 voxel",
            "method": method, "layer": layer, "held_out_seeds": _span(seeds)}


def _span(seeds: Iterable[int]) -> list[int]:
    seeds = list(seeds)
    return [min(seeds), max(seeds)] if seeds else []
