"""The benchmark's cases: the models, phantom sizes, methods and settings it runs, on a CPU and on a GPU, and the
choice of some of them by name (``--cases``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from ..errors import InputError

__all__ = ["BENCH_SEED", "CLASSIFIER_METHODS", "LOADED", "LOAD_PROCESSES", "MEMORY_SCENARIOS", "MEMORY_MB",
           "MEMORY_BOUNDS", "UNET_METHODS_CPU", "UNET_METHODS_CUDA", "OCCLUSION", "OCCLUSION_ENGINES", "BATCHES",
           "UNET_SHAPES", "OCCLUSION_PATCH", "QUICK_BATCHES", "Case", "plan_cases", "select_cases"]


BENCH_SEED = 777
"""Phantom seed: below training's seeds (from 1000 up) and far from the held-out ones (from 900 000 up)."""

CLASSIFIER_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("gradcam", {}), ("gradcam_plus_plus", {}), ("saliency", {}), ("integrated_gradients", {"steps": 32}),
    ("smoothgrad", {"samples": 16}), ("gradient_shap", {"samples": 16}), ("deeplift", {}), ("lrp", {}),
    ("lime", {"samples": 500}))
LOADED = ("integrated_gradients", {"steps": 32})
"""The case timed again while :data:`LOAD_PROCESSES` busy processes compete for the CPU (a shared machine)."""
LOAD_PROCESSES = 2
MEMORY_SCENARIOS = {"roi": ((128, 0.0), (512, 0.0)), "whole": ((128, 0.5), (512, 0.0))}
"""Memory-only cases (``memory-roi128``, ...), (size, tile overlap) per scenario: the U-Net's saliency through
``ctxai explain``'s path (every part-sized array of a run, its files written), in a fresh process, on the 128³
phantom repeated to N³, with the memory budget :data:`MEMORY_MB`. The small part's peak is the working set and the
large part's peak beyond it, in volumes of the large part, is what the part itself costs (its own array included),
so both runs of a scenario must batch alike. ``roi``: one voxel, abutting tiles (the same tiles at both sizes);
``whole``: the target summed over the whole part (all of it predicted and explained), the small part's tiles
overlapping by half (27 tiles) so that its batch-size search reaches the sizes of the large part's 512 tiles (about
5 minutes on 2 cores; at 256³ the working set's own swings of ~100 MiB would be 1.5 volumes)."""
MEMORY_MB = 512.0
"""The memory cases' budget: the U-Net's 64³ tiles are estimated at 213 MiB a sample, so the batch-size search of
both parts of a scenario stops at the same sizes (a larger part's search would otherwise reach larger batches, and
their activations would count as the part's)."""
MEMORY_BOUNDS = {"roi": 1.5, "whole": 3.75}
"""Bounds on the large part's peak beyond the small one's, in its float32 volumes. ``roi``: the issue's 1.5 (the
volume itself is one of them). ``whole``: what such a run must hold at once: the volume (1), its float32 map (1)
and the float16 prediction of the U-Net's 3 classes (1.5), with a quarter for the blending window and slabs."""
UNET_METHODS_CPU = ("saliency", "gradcam", "confidence")
UNET_METHODS_CUDA = tuple(name for name, _ in CLASSIFIER_METHODS) + ("confidence",)
OCCLUSION = {"window": 8, "stride": 4}
OCCLUSION_ENGINES = ("exhaustive", "incremental")
BATCHES = (1, 2, 4, 8, 16, 32)
"""Batch sizes tried for the limit's fastest time per sample."""

_CLASSIFIER_SHAPE = 128  # the phantom the classifier patches are cut from: the shape the models were trained on
UNET_SHAPES = (128, 256)
OCCLUSION_PATCH = 48
_QUICK_SHAPE = 64
_QUICK_CLASSIFIER = (("gradcam", {}), ("integrated_gradients", {"steps": 4}))
_QUICK_OCCLUSION = {"window": 16, "stride": 16}
_QUICK_UNET = ("saliency",)
QUICK_BATCHES = (1, 2)
_CPU_SKIP = ("one 64³ U-Net forward and backward takes about a second on a CPU and a 256³ part has 125 tiles; "
             "the CPU run keeps the cheap methods, a CUDA run covers them all")


@dataclass
class Case:
    """One benchmark case: a model on a phantom, a method, and the engine variants to time (one table row each).

    ``variants`` are ``{"row": name, "settings": {...}, "heavy": bool}``; a heavy variant (and heavy references)
    runs once, after a light warm-up, on a CPU. The fields after ``heavy_references`` are filled in when it runs.
    """

    name: str
    model: str                  # "classifier", "classifier48" (its card with a 48³ patch) or "unet"
    shape: int                  # edge of the phantom, voxels
    method: str
    variants: list[dict[str, Any]]
    heavy_references: bool = False
    card: str = ""
    volume: str = ""
    target: dict[str, Any] = field(default_factory=dict)  # {"class": name, "voxel": [i, j, k] or None}
    device: str = "cpu"
    precision: str = "fp32"
    repeats: int = 3
    batches: list[int] = field(default_factory=lambda: list(BATCHES))
    load: int = 0               # busy processes that compete for the CPU while the case is timed
    memory_only: bool = False   # a fresh process's peak memory through ctxai explain's path; nothing is timed
    memory_target: str | None = None  # a memory case's scenario: a key of MEMORY_SCENARIOS
    overlap: float = 0.25       # of the sliding window's tiles
    memory_mb: float | None = None  # the Explainer's memory budget (default: a share of free memory)

    @property
    def rows(self) -> list[str]:
        return [v["row"] for v in self.variants]


def plan_cases(device_type: str, quick: bool = False) -> tuple[list[Case], list[dict[str, str]]]:
    """The cases for a device type ("cpu" or "cuda") and the U-Net rows left out there, with the reason."""
    cpu = device_type == "cpu"
    shape = _QUICK_SHAPE if quick else _CLASSIFIER_SHAPE
    classifier = _QUICK_CLASSIFIER if quick else CLASSIFIER_METHODS
    occlusion = _QUICK_OCCLUSION if quick else OCCLUSION
    cases = [Case(f"classifier-{name}", "classifier", shape, name,
                  [{"row": f"classifier-{name}", "settings": dict(settings), "heavy": False}])
             for name, settings in classifier]
    if not quick:
        name, settings = LOADED
        cases.append(Case(f"classifier-{name}-loaded", "classifier", shape, name,
                          [{"row": f"classifier-{name}-loaded", "settings": dict(settings), "heavy": False}],
                          load=LOAD_PROCESSES))
    cases.append(Case("occlusion", "classifier48", shape, "occlusion",
                      [{"row": f"occlusion-{engine}", "settings": {**occlusion, "engine": engine},
                        "heavy": cpu and engine == "exhaustive"} for engine in OCCLUSION_ENGINES],
                      heavy_references=cpu))
    settings = dict(CLASSIFIER_METHODS)
    skipped = []
    if not quick:
        cases += [Case(f"memory-{scenario}{size}", "unet", size, "saliency",
                       [{"row": f"memory-{scenario}{size}", "settings": {}, "heavy": True}], memory_only=True,
                       overlap=overlap, memory_mb=MEMORY_MB, memory_target=scenario)
                  for scenario, sizes in MEMORY_SCENARIOS.items() for size, overlap in sizes]
    for size in ((_QUICK_SHAPE,) if quick else UNET_SHAPES):
        heavy = cpu and size >= 256
        wanted = _QUICK_UNET if quick else (UNET_METHODS_CPU if cpu else UNET_METHODS_CUDA)
        for name in UNET_METHODS_CUDA:
            row = f"unet{size}-{name}"
            if name in wanted:
                cases.append(Case(row, "unet", size, name,
                                  [{"row": row, "settings": dict(settings.get(name, {})), "heavy": heavy}],
                                  heavy_references=heavy))
            elif not quick:
                skipped.append({"row": row, "reason": _CPU_SKIP})
    return cases, skipped


def select_cases(cases: list[Case], patterns: Sequence[str] | None, skipped: list[dict[str, str]],
                 others: Sequence[str] = ()) -> list[Case]:
    """The cases whose rows contain one of ``patterns`` (all without patterns), each with those rows only;
    ``others`` are the names of rows run elsewhere, listed with the cases when a pattern matches nothing."""
    if not patterns:
        return cases
    rows = [row for case in cases for row in case.rows]
    unmatched = [p for p in patterns if not any(p in row for row in rows)]
    if unmatched:
        left_out = [s["row"] for s in skipped if any(p in s["row"] for p in unmatched)]
        hint = f" ({', '.join(left_out)} left out on this device: {skipped[0]['reason']})" if left_out else ""
        raise InputError(f"No benchmark case matches {', '.join(map(repr, unmatched))}{hint}. Available cases: "
                         f"{', '.join([*rows, *others])}. Give --cases as comma-separated parts of these names.")
    chosen = []
    for case in cases:
        variants = [v for v in case.variants if any(p in v["row"] for p in patterns)]
        if variants:
            chosen.append(replace(case, variants=variants))
    return chosen
