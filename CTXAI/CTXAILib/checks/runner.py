"""Runs the checks a run asks for and turns them into a verdict.

>>> from CTXAILib.checks.runner import explain_and_check                      # doctest: +SKIP
>>> result, checks = explain_and_check(explainer, volume, "gradcam", Target("pore"), checks=["all"])
...                                                                          # doctest: +SKIP
>>> checks["verdict"]["verdict"]                                              # doctest: +SKIP
'trusted'

Verdicts: ``not trusted`` when a blocking check fails (the map does not depend on the model or the target, or is
not faithful to the score); ``caution`` when only a non-blocking one fails (spill, stability, localisation);
``trusted`` when every check made passed; ``unchecked`` when none was made.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from . import faithfulness, localisation, randomisation, sensitivity, spill, stability  # noqa: F401 (register)
from .base import CheckContext, CheckResult, get_check, list_checks

if TYPE_CHECKING:
    from ..engine.explain import Explainer, Explanation
    from ..engine.geometry import Volume

__all__ = ["DEFAULT_CHECKS", "CHEAP_CHECKS", "resolve_checks", "run_checks", "explain_and_check", "verdict"]

CHEAP_CHECKS = ("spill", "target_sensitivity")
"""What the panel runs by default: at most one more run of the method."""
DEFAULT_CHECKS = CHEAP_CHECKS


def resolve_checks(names: Iterable[str] | str | None, task: str, has_reference: bool = False) -> list[str]:
    """Check names from a list or a comma-separated string; ``all`` is every check that applies."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    chosen: list[str] = []
    for name in names:
        if name == "all":
            chosen += [c.name for c in list_checks()
                       if (task == "segmentation" or not c.segmentation_only) and (has_reference or not
                                                                                   c.needs_reference)]
        elif name != "none":
            chosen.append(get_check(name).name)
    return list(dict.fromkeys(chosen))


def verdict(results: Sequence[CheckResult]) -> dict[str, Any]:
    made = [r for r in results if r.passed is not None]
    failed = [r for r in made if not r.passed]
    if not made:
        word = "unchecked"
    elif any(get_check(r.name).blocking for r in failed):
        word = "not trusted"
    elif failed:
        word = "caution"
    else:
        word = "trusted"
    return {"verdict": word, "reasons": [f"{r.name}: {r.what}" for r in failed],
            "passed": [r.name for r in made if r.passed], "failed": [r.name for r in failed],
            "not_made": [r.name for r in results if r.passed is None]}


def run_checks(ctx: CheckContext, names: Sequence[str]) -> dict[str, Any]:
    """``{"checks": {name: result}, "verdict": {...}}`` for the run in ``ctx``."""
    results = []
    for name in names:
        started = time.perf_counter()
        result = get_check(name).run(ctx)
        result.seconds = time.perf_counter() - started
        results.append(result)
    return {"checks": {r.name: r.to_dict() for r in results}, "verdict": verdict(results)}


def explain_and_check(explainer: Explainer, volume: Volume, method: str, target: Any = None,
                      checks: Iterable[str] | str | None = DEFAULT_CHECKS, reference_mask: np.ndarray | None = None,
                      layer: str | None = None, settings: dict | None = None, seed: int = 0,
                      progress: Callable | None = None, cancel: Any = None, output: str = "full",
                      report: Callable[[str], None] | None = None) -> tuple[Explanation, dict[str, Any]]:
    """Explain, measuring faithfulness on the way when it is asked for, then run the other checks."""
    from .faithfulness import faithfulness_check

    names = resolve_checks(checks, explainer.model.card.task, reference_mask is not None)
    result = explainer.explain(volume, method, target, layer=layer, settings=settings, progress=progress,
                               cancel=cancel, seed=seed, output=output,
                               evaluate=faithfulness_check if "faithfulness" in names else None)
    if not names:
        return result, {}
    if result.family == "prediction":  # the model's own probabilities: nothing to verify about an explanation
        return result, {"checks": {}, "verdict": {"verdict": "unchecked", "reasons": [
            "the confidence map is the model's prediction, not an explanation"], "passed": [], "failed": [],
            "not_made": names}}
    ctx = CheckContext(explainer, volume, result, layer=result.layer, seed=seed, reference_mask=reference_mask,
                       report=report or (lambda message: None), cancel=cancel)
    return result, run_checks(ctx, names)
