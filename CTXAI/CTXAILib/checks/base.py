"""What every check shares: its result, the registry, the region where maps are compared, rank correlation, and
the trivial control maps that each check is validated against (seeds 001 and 002: an explanation must itself be
verified, and a check that a trivial map passes is a defect).

A check compares the run's map with something: the map of a randomised model, of another target, of a noisy input,
a perturbation curve, the predicted components or a reference mask. It returns a :class:`CheckResult` with its value,
its threshold, pass or fail, the values the controls get on the same check, and one line saying what it means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..engine.geometry import Box

if TYPE_CHECKING:
    from ..engine.explain import Explainer, Explanation
    from ..engine.geometry import Volume

__all__ = ["CheckResult", "CheckContext", "Check", "register_check", "get_check", "list_checks", "map_in",
           "informative_region", "rank_correlation", "control_maps"]


@dataclass
class CheckResult:
    """One check of one map. ``passed`` is None where the check could not be made (``what`` says why)."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool | None
    what: str
    controls: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "threshold": self.threshold, "pass": self.passed, "controls": self.controls,
                "what": self.what, "details": self.details, "seconds": round(self.seconds, 3)}


@dataclass
class CheckContext:
    """A run to check: the explainer that made it (model warm), its input, the explanation and its settings."""

    explainer: Explainer
    volume: Volume
    explanation: Explanation
    layer: str | None = None
    seed: int = 0
    reference_mask: np.ndarray | None = None   # (k, j, i) over the whole volume, for localisation
    report: Callable[[str], None] = lambda message: None
    cancel: Any = None                         # the run's CancelToken: re-runs stop with it

    def rerun(self, box: Box | None = None, **changes: Any) -> np.ndarray:
        """The same method and settings with some inputs changed (``explainer``, ``volume``, ``target``, ``seed``):
        the new map over ``box`` (default: the original run's extent)."""
        e = self.explanation
        explainer = changes.pop("explainer", self.explainer)
        volume = changes.pop("volume", self.volume)
        target = changes.pop("target", e.fixed_target)
        seed = changes.pop("seed", self.seed)
        result = explainer.explain(volume, e.method, target, layer=self.layer or e.layer, settings=e.settings,
                                   seed=seed, cancel=self.cancel)
        return map_in(result, box or e.extent)


@dataclass(frozen=True)
class Check:
    """A registered check: ``run(ctx) -> CheckResult``. Its cost, which the panel shows before the user asks for
    it: ``runs`` re-runs of the method plus ``passes`` forward passes over the run's extent."""

    name: str
    label: str
    summary: str
    run: Callable[[CheckContext], CheckResult]
    runs: float
    passes: int = 0
    segmentation_only: bool = False
    needs_reference: bool = False
    blocking: bool = True  # a failure makes the map "not trusted" rather than "use with care"


_CHECKS: dict[str, Check] = {}


def register_check(check: Check) -> Check:
    _CHECKS[check.name] = check
    return check


def get_check(name: str) -> Check:
    from ..errors import SettingError

    if name not in _CHECKS:
        raise SettingError(f"Unknown check {name!r}; the checks are: {', '.join(_CHECKS)} (or 'all').")
    return _CHECKS[name]


def list_checks() -> list[Check]:
    return list(_CHECKS.values())


def map_in(explanation: Explanation, box: Box | None = None) -> np.ndarray:
    """The map (k, j, i) over ``box`` of the input (default: the run's extent), zero where the run computed
    nothing; whether the run returned the map over the whole input or over its extent only."""
    box = box or explanation.extent
    array = explanation.attribution.array
    # An extent-only map covers the extent; a full map covers the input from its origin.
    source = explanation.extent if array.shape == explanation.extent.shape else Box.whole(array.shape)
    out = np.zeros(box.shape, np.float32)
    overlap = box.intersect(source)
    if not overlap.empty:
        out[overlap.offset([-v for v in box.lo]).slices] = array[overlap.offset([-v for v in source.lo]).slices]
    return out


def informative_region(explanation: Explanation, margin_fraction: float = 0.5, min_margin: int = 4) -> np.ndarray:
    """Where maps are compared, as a mask over the run's extent (k, j, i).

    A classifier's map means something everywhere in its patch. A segmentation target's map is non-zero only near
    the target for any U-Net, trained or not (locality of convolutions), so comparing whole volumes would reward
    that locality: the comparison is made in the target's box grown by half its size (at least ``min_margin``
    voxels), where a trained network's structure, not the distance to the target, must shape the map.
    """
    extent = explanation.extent
    mask = np.zeros(extent.shape, bool)
    if explanation.prediction.get("task") != "segmentation":
        mask[...] = True
        return mask
    lo, hi = explanation.target["box"]
    box = Box(lo, hi)
    margin = [max(min_margin, int(round(margin_fraction * s))) for s in box.size]
    near = box.grow(margin).intersect(extent).offset([-v for v in extent.lo])
    mask[near.slices] = True
    return mask


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps' magnitudes (ties share their mean rank). Two constant maps are the
    same map (1.0); a constant map says nothing about a varying one (0.0)."""
    from scipy.stats import rankdata

    a, b = np.abs(np.ravel(a)).astype(np.float64), np.abs(np.ravel(b)).astype(np.float64)
    flat_a, flat_b = np.ptp(a) == 0, np.ptp(b) == 0
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b else 0.0
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def control_maps(explanation: Explanation, seed: int = 0) -> dict[str, np.ndarray]:
    """The trivial maps every check is validated against, over the run's extent (k, j, i):

    - ``centre``: a Gaussian peaking at the centre of the extent (a classifier's patch is centred on the defect);
    - ``target_blur``: the target region blurred by a quarter of its size plus two voxels (what a map gets from
      locality alone);
    - ``random``: independent uniform noise (seeded).
    """
    from scipy import ndimage

    extent = explanation.extent
    shape = extent.shape
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2.0 for n in shape], indexing="ij")
    sigma = [max(n / 6.0, 1.0) for n in shape]
    centre = np.exp(-0.5 * sum((g / s) ** 2 for g, s in zip(grids, sigma))).astype(np.float32)
    # The target's box lies inside the extent: the extent is the patch around it or the tiles that cover it.
    box = Box(*explanation.target["box"])
    region = np.zeros(shape, np.float32)
    mask = getattr(explanation.fixed_target.region, "mask", None) if explanation.fixed_target else None
    region[box.offset([-v for v in extent.lo]).slices] = 1.0 if mask is None else mask
    blur = ndimage.gaussian_filter(region, [s / 4.0 + 2.0 for s in reversed(box.size)]).astype(np.float32)
    random = np.random.default_rng(seed).random(shape, dtype=np.float32)
    return {"centre": centre, "target_blur": blur, "random": random}
