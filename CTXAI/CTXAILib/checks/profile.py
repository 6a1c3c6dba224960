"""A trust profile per model: every method through the checks on a few cases, and a recommendation per method.

The profile is what the panel reads to mark the methods it advises against on a model. It is cached beside the
model card as ``<card>.profile.json`` and keyed by the weights' sha256, so a retrained model is never judged by an
old profile. A method's check passes on the model when it passes on most cases (its median value is reported).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from ..engine.explain import Explainer
    from ..engine.geometry import Volume
    from ..engine.targets import Target

__all__ = ["ProfileCase", "build_profile", "profile_path", "read_profile", "format_profile", "PROFILE_CHECKS"]

PROFILE_CHECKS = ("randomisation", "target_sensitivity", "faithfulness", "spill", "stability", "localisation")


@dataclass
class ProfileCase:
    """One input to profile on: a volume, a target on it and, where known, the reference mask of the defect."""

    volume: Volume
    target: Target
    description: str
    reference_mask: np.ndarray | None = None


def profile_path(card: str | Path) -> Path:
    card = Path(card)
    return card.with_name(card.stem + ".profile.json")


def read_profile(card: str | Path, sha256: str | None = None) -> dict[str, Any] | None:
    """The cached profile of a model card, or None when there is none or it is for other weights."""
    path = profile_path(card)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if sha256 is not None and data.get("model", {}).get("sha256") != sha256:
        return None
    return data


def _recommend(checks: dict[str, dict[str, Any]]) -> tuple[str, str]:
    from .base import get_check

    failed = [name for name, c in checks.items() if c["pass"] is False]
    blocking = [name for name in failed if get_check(name).blocking]
    if blocking:
        return "do not use", "fails " + ", ".join(blocking) + " on this model"
    if failed:
        return "use with care", "fails " + ", ".join(failed)
    return "use", "passes every check made"


def build_profile(explainer: Explainer, cases: Sequence[ProfileCase], methods: Sequence[str],
                  checks: Sequence[str] = PROFILE_CHECKS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``methods`` through ``checks`` on ``cases`` with ``explainer``'s model; the profile as a dict."""
    from ..errors import CTXAIError
    from .runner import explain_and_check, resolve_checks

    task = explainer.model.card.task
    per_method: dict[str, Any] = {}
    for method in methods:
        values: dict[str, list] = {}
        errors = []
        for case in cases:
            names = [n for n in resolve_checks(list(checks), task, case.reference_mask is not None)]
            try:
                _, verified = explain_and_check(explainer, case.volume, method, case.target, checks=names,
                                                reference_mask=case.reference_mask)
            except CTXAIError as exc:
                errors.append(f"{case.description}: {exc}")
                continue
            for name, check in verified.get("checks", {}).items():
                values.setdefault(name, []).append(check)
        summary = {}
        for name, results in values.items():
            made = [r for r in results if r["pass"] is not None]
            if not made:
                continue
            numbers = [r["value"] for r in made if r["value"] is not None]
            passes = sum(bool(r["pass"]) for r in made)
            summary[name] = {"pass": passes * 2 > len(made), "passed_cases": passes, "cases": len(made),
                             "median": round(statistics.median(numbers), 4) if numbers else None,
                             "threshold": made[0]["threshold"]}
        word, why = _recommend(summary) if summary else ("not profiled", "; ".join(errors) or "no case ran")
        per_method[method] = {"recommendation": word, "why": why, "checks": summary, "errors": errors}
        log(f"{method:20s} {word}: {why}")
    card = explainer.model.card
    return {"model": {"name": card.name, "sha256": explainer.model.sha256, "task": task},
            "cases": [c.description for c in cases], "checks": list(checks), "methods": per_method}


def format_profile(profile: dict[str, Any]) -> str:
    """The profile as a Markdown table: per method, each check's passed cases and the recommendation."""
    names = [n for n in profile["checks"] if any(n in m["checks"] for m in profile["methods"].values())]
    lines = ["| method | " + " | ".join(names) + " | recommendation |",
             "|---|" + "---|" * len(names) + "---|"]
    for method, entry in profile["methods"].items():
        cells = []
        for name in names:
            c = entry["checks"].get(name)
            cells.append("–" if c is None else
                         f"{'pass' if c['pass'] else '**fail**'} {c['passed_cases']}/{c['cases']} ({c['median']})")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {entry['recommendation']}: {entry['why']} |")
    return "\n".join(lines)
