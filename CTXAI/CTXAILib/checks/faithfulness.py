"""How faithful is a map? Deletion and insertion curves (MoRF) against several random voxel orders (seeds 001, 002).

Deletion replaces the most relevant voxels first and follows the target score as more are replaced; insertion
starts from the fill and puts the most relevant voxels back first. A faithful map makes the score fall fast on
deletion and rise fast on insertion, faster than random orders of the same voxels.

- **Ranking.** Voxels are ranked by |map|: for a signed map the strongest evidence either way comes first (a map
  whose strongest voxels argue against the target is still right about where the model looks). The ranking by the
  positive part alone is reported too (``deletion_auc_positive``). Ties (a constant map, a map with plateaus) are
  broken at random, so a constant map scores like a random order.
- **Fill.** Replaced voxels take the ``part_mean`` baseline: inside the part the part's mean grey value, air
  outside. Deleting a pore fills it with metal and deleting metal leaves metal: the model never sees a hole that no
  scan has (zeros or air inside a part are out of distribution and make any order look faithful).
- **Scale.** Scores are normalised so that the input scores 1 and the fill 0, clipped to [0, 1] (a score past the
  input's counts as fully restored), and averaged over the log of the fraction replaced, from 0.1 % to 50 %
  (:data:`FRACTIONS`): a good map needs only the first few percent, and a linear axis would let the long tail,
  where every order has reached the fill, decide.
- **Judgement.** ``deletion_gain`` is the random orders' mean deletion AUC minus the map's; the check passes when it
  is at least :data:`THRESHOLD` and three standard deviations of the :data:`RANDOM_ORDERS` random orders. A random
  map and a constant map (the controls) gain nothing by construction; a map peaking at the centre is reported beside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .base import Check, CheckContext, CheckResult, register_check

if TYPE_CHECKING:
    from ..engine.explain import Probe

__all__ = ["FRACTIONS", "RANDOM_ORDERS", "THRESHOLD", "FILL", "faithfulness", "faithfulness_check",
           "faithfulness_result"]

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
RANDOM_ORDERS = 4
THRESHOLD = 0.05
FILL = "part_mean"
_LOG = np.log10(FRACTIONS)


def _order(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Voxel indices by decreasing value, ties in random order."""
    shuffled = rng.permutation(values.size)
    return shuffled[np.argsort(-values[shuffled], kind="stable")]


def _curve(forward: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, end: torch.Tensor,
           order: np.ndarray, batch_size: int) -> np.ndarray:
    """Scores of ``start`` with the first fraction of ``order``'s voxels taken from ``end``, per FRACTION."""
    spatial = start.shape[2:]
    samples = []
    for fraction in FRACTIONS:
        mask = np.zeros(int(np.prod(spatial)), bool)
        mask[order[:max(1, int(round(fraction * order.size)))]] = True
        samples.append(torch.where(torch.from_numpy(mask.reshape(spatial)), end, start))
    batch_size = max(1, batch_size)
    scores = [forward(torch.cat(samples[i:i + batch_size])) for i in range(0, len(samples), batch_size)]
    return torch.cat(scores).double().numpy()


def _auc(curve: np.ndarray) -> float:
    """Mean of the normalised curve over log10(fraction)."""
    curve = np.clip(curve, 0.0, 1.0)
    return float(np.sum((_LOG[1:] - _LOG[:-1]) * (curve[1:] + curve[:-1]) / 2.0) / (_LOG[-1] - _LOG[0]))


def faithfulness(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, fill: torch.Tensor,
                 attribution: np.ndarray, batch_size: int = 8, seed: int = 0,
                 extra: dict[str, np.ndarray] | None = None) -> dict:
    """Deletion and insertion AUCs of ``attribution`` (k, j, i over the extent of ``x``, (1, C, k, j, i)), of
    :data:`RANDOM_ORDERS` random orders (mean and standard deviation) and of the ``extra`` maps (controls).

    ``forward`` maps a batch of extents to the target score, as the perturbation methods query the model.
    """
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        ends = forward(torch.cat([x, fill])).double().numpy()
    span = ends[0] - ends[1]
    if abs(span) < 1e-6 * max(1.0, abs(ends[0])):
        return {"score_input": float(ends[0]), "score_fill": float(ends[1]), "fill": FILL,
                "note": "filling the whole extent does not change the score: faithfulness cannot be measured"}

    def aucs(order: np.ndarray) -> tuple[float, float]:
        with torch.no_grad():
            deletion = (_curve(forward, x, fill, order, batch_size) - ends[1]) / span
            insertion = (_curve(forward, fill, x, order, batch_size) - ends[1]) / span
        return _auc(deletion), _auc(insertion)

    magnitude = np.abs(attribution).ravel()
    deletion, insertion = aucs(_order(magnitude, rng))
    randoms = np.array([aucs(rng.permutation(magnitude.size)) for _ in range(RANDOM_ORDERS)])
    out = {"deletion_auc": deletion, "insertion_auc": insertion,
           "deletion_auc_random": float(randoms[:, 0].mean()), "deletion_auc_random_std": float(randoms[:, 0].std()),
           "insertion_auc_random": float(randoms[:, 1].mean()),
           "insertion_auc_random_std": float(randoms[:, 1].std()),
           "score_input": float(ends[0]), "score_fill": float(ends[1]), "fill": FILL, "ranking": "|map|",
           "fractions": list(FRACTIONS)}
    out["deletion_gain"] = out["deletion_auc_random"] - deletion
    out["insertion_gain"] = insertion - out["insertion_auc_random"]
    if (attribution < 0).any():  # a signed map: where its positive evidence alone leads
        out["deletion_auc_positive"] = aucs(_order(attribution.ravel(), rng))[0]
    for name, control in (extra or {}).items():
        out[f"deletion_gain_{name}"] = out["deletion_auc_random"] - aucs(_order(np.abs(control).ravel(), rng))[0]
    return out


def _centre(shape: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2.0 for n in shape], indexing="ij")
    return np.exp(-0.5 * sum((g / max(n / 6.0, 1.0)) ** 2 for g, n in zip(grids, shape)))


def faithfulness_check(probe: Probe, attribution: np.ndarray) -> dict:
    """:func:`faithfulness` of a run's map, as an ``evaluate`` hook of :meth:`CTXAILib.Explainer.explain`; the
    centre map is measured beside it as a control."""
    fill = probe.baseline(FILL)
    return faithfulness(probe.forward, probe.x, fill, attribution, probe.batch_size, probe.seed,
                        extra={"centre": _centre(attribution.shape)})


def faithfulness_result(quality: dict) -> CheckResult:
    """The faithfulness check from the numbers a run measured with :func:`faithfulness_check`."""
    if "deletion_auc" not in quality:
        return CheckResult("faithfulness", None, THRESHOLD, None, quality.get("note", "not measured"))
    threshold = max(THRESHOLD, 3.0 * quality["deletion_auc_random_std"])
    gain = quality["deletion_gain"]
    passed = gain >= threshold
    what = (f"removing the map's top voxels first lowers the score faster than random orders (deletion gain "
            f"{gain:.2f} >= {threshold:.2f})" if passed else
            f"removing the map's top voxels first lowers the score no faster than random orders (deletion gain "
            f"{gain:.2f} < {threshold:.2f}): the map does not show what the score depends on")
    controls = {"random": 0.0, "constant": 0.0}  # ties and random orders are the reference itself
    if "deletion_gain_centre" in quality:
        controls["centre"] = round(quality["deletion_gain_centre"], 4)
    details = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in quality.items()
               if k not in ("deletion_gain_centre",)}
    return CheckResult("faithfulness", round(gain, 4), round(threshold, 4), passed, what, controls, details)


def _faithfulness(ctx: CheckContext) -> CheckResult:
    return faithfulness_result(ctx.explanation.quality)


register_check(Check("faithfulness", "Faithfulness (deletion / insertion)",
                     f"score drop when the top |map| voxels are replaced by the {FILL} fill, against random orders, "
                     "on a log scale of the fraction replaced", _faithfulness, runs=0.0,
                     passes=2 * len(FRACTIONS) * (RANDOM_ORDERS + 3) + 2))
