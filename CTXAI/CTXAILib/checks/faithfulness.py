"""How faithful is an explanation? Deletion and insertion curves against a random ordering (seeds 001 and 002).

Deletion removes the most relevant voxels first (replacing them with the method's reference, by default a
defect-free part) and follows the target
score as more are removed; insertion starts from the fill and puts the most relevant voxels back first. A faithful
map makes the score fall fast on deletion and rise fast on insertion. Both are reported beside the same curves for a
random voxel order, so "better than chance" can be read directly:

- ``deletion_auc`` (lower is better) and ``deletion_auc_random``;
- ``insertion_auc`` (higher is better) and ``insertion_auc_random``.

Scores are normalised so that the input scores 1 and the fill 0; the area is taken over the fraction of voxels
changed, on a log-spaced grid that dwells on the few voxels a good map should need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from ..engine.explain import Probe

__all__ = ["FRACTIONS", "faithfulness", "faithfulness_check"]

FRACTIONS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _curve(forward: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, end: torch.Tensor,
           order: np.ndarray, batch_size: int) -> np.ndarray:
    """Scores of ``start`` with the first fraction of ``order``'s voxels taken from ``end``, per FRACTION."""
    spatial = start.shape[2:]
    samples = []
    for fraction in FRACTIONS:
        mask = np.zeros(int(np.prod(spatial)), bool)
        mask[order[:int(round(fraction * order.size))]] = True
        mask = torch.from_numpy(mask.reshape(spatial))
        samples.append(torch.where(mask, end, start))
    scores = [forward(torch.cat(samples[i:i + batch_size])) for i in range(0, len(samples), max(1, batch_size))]
    return torch.cat(scores).double().numpy()


def _auc(curve: np.ndarray) -> float:
    x = np.asarray(FRACTIONS)
    return float(np.sum((x[1:] - x[:-1]) * (curve[1:] + curve[:-1]) / 2.0))


def faithfulness(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, fill: torch.Tensor,
                 attribution: np.ndarray, batch_size: int = 8, seed: int = 0) -> dict[str, float]:
    """Deletion and insertion AUCs of ``attribution`` (k, j, i over the extent of ``x``, (1, C, k, j, i)).

    ``forward`` maps a batch of extents to the target score, as the perturbation methods query the model. Voxels
    are ranked by value, so for signed maps the evidence for the target comes first and against it last.
    """
    values = attribution.ravel()
    order = np.argsort(-values, kind="stable")
    random_order = np.random.default_rng(seed).permutation(values.size)
    with torch.no_grad():
        ends = forward(torch.cat([x, fill])).double().numpy()
    span = ends[0] - ends[1]
    if abs(span) < 1e-12 * max(1.0, abs(ends[0])):
        return {"score_input": float(ends[0]), "score_fill": float(ends[1]),
                "note": "the fill does not change the score: faithfulness cannot be measured"}

    def normalised(curve: np.ndarray) -> np.ndarray:
        return (curve - ends[1]) / span

    with torch.no_grad():
        deletion = normalised(_curve(forward, x, fill, order, batch_size))
        insertion = normalised(_curve(forward, fill, x, order, batch_size))
        deletion_random = normalised(_curve(forward, x, fill, random_order, batch_size))
        insertion_random = normalised(_curve(forward, fill, x, random_order, batch_size))
    return {"deletion_auc": _auc(deletion), "deletion_auc_random": _auc(deletion_random),
            "insertion_auc": _auc(insertion), "insertion_auc_random": _auc(insertion_random),
            "score_input": float(ends[0]), "score_fill": float(ends[1])}


def faithfulness_check(probe: Probe, attribution: np.ndarray) -> dict:
    """:func:`faithfulness` of a run's map, as an ``evaluate`` hook of :meth:`CTXAILib.Explainer.explain`."""
    # Deletion fills with the method's own reference when it has one: the map is relative to it.
    reference = probe.settings.get("baseline", probe.settings.get("fill", "part_mean"))
    fill = probe.baseline(reference, probe.settings.get("blur_sigma_mm", 2.0))
    scores = faithfulness(probe.forward, probe.x, fill, attribution, probe.batch_size, probe.seed)
    scores["fill"] = reference
    return scores
