"""``ctxai bench --cases batch``: how many regions ``ctxai batch`` explains per minute with 1 and 2 local workers
and on a local Ray, and what Ray costs against the local pool with as many workers.

The parts are phantoms (seeds from :data:`.cases.BENCH_SEED`, 64³ voxels); the U-Net explains every predicted
region of at least :data:`MIN_VOXELS` voxels with saliency (policy ``all``, no checks), so that the figures are the
batch's scheduling and per-item costs, not a method's. Each row is a fresh batch folder: the wall time counts
starting the workers (each loads the model once), predicting, explaining and writing; a local Ray's own start is
timed apart (``ray_init_s``), as a site's cluster is already running.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .cases import BENCH_SEED

__all__ = ["BATCH_ROWS", "MIN_VOXELS", "run_batch_rows", "format_batch"]

BATCH_ROWS = ("batch-local-1", "batch-local-2", "batch-ray-2")
MIN_VOXELS = 3
_PARTS, _QUICK_PARTS = 4, 2
_DEFECTS = {"pore": 2, "inclusion_dense": 1}


def _engine(row: str) -> tuple[str, int]:
    _, engine, workers = row.split("-")
    return engine, int(workers)


def run_batch_rows(rows: Sequence[str], workdir: Path, device: str, quick: bool,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Time the batch ``rows`` (names from :data:`BATCH_ROWS`) in ``workdir``; the report's ``batch`` section."""
    from ..batch.run import run_batch
    from ..engine.geometry import write_volume
    from ..synthetic.evaluation import bundled_model
    from ..synthetic.phantom import generate_phantom

    parts = workdir / "batch-parts"
    parts.mkdir()
    seeds = [BENCH_SEED + n for n in range(_QUICK_PARTS if quick else _PARTS)]
    log(f"generating {len(seeds)} batch parts (seeds {seeds[0]}-{seeds[-1]}, 64³ voxels)")
    for seed in seeds:
        write_volume(generate_phantom(seed, (64, 64, 64), defect_counts=_DEFECTS).ct, parts / f"part{seed}.nrrd")
    measured = []
    for row in rows:
        engine, workers = _engine(row)
        ray_init = None
        if engine == "ray":
            from ..batch.engines import import_ray

            ray = import_ray(local=True)
            started = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            ray_init = time.perf_counter() - started
        log(f"{row}: a batch over {len(seeds)} parts")
        try:
            started = time.perf_counter()
            batch = run_batch(bundled_model("unet"), parts, workdir / row, policy="all", methods=["saliency"],
                              engine=engine, workers=workers, device=device, min_voxels=MIN_VOXELS)
            wall = time.perf_counter() - started
        finally:
            if engine == "ray":
                ray.shutdown()
        done = [r for r in batch["rows"] if r["status"] == "done"]
        measured.append({"row": row, "engine": engine, "workers": workers, "threads": batch["workers"]["threads"],
                         "parts": len(seeds), "regions": batch["counts"]["regions"], "explained": len(done),
                         "failed": batch["counts"]["failed"], "wall_s": round(wall, 2),
                         "ray_init_s": None if ray_init is None else round(ray_init, 2),
                         "regions_per_minute": round(len(done) / wall * 60, 2),
                         "median_item_s": round(statistics.median(r["seconds"] for r in done), 3) if done else None})
    walls = {m["row"]: m["wall_s"] for m in measured}
    overhead = (walls["batch-ray-2"] / walls["batch-local-2"] - 1.0
                if {"batch-ray-2", "batch-local-2"} <= set(walls) else None)
    return {"seeds": seeds, "shape_kji": [64, 64, 64], "defects": _DEFECTS, "method": "saliency", "policy": "all",
            "min_voxels": MIN_VOXELS, "rows": measured,
            "ray_overhead_over_local_2": None if overhead is None else round(overhead, 3)}


def format_batch(section: dict[str, Any]) -> list[str]:
    """The batch section as text lines."""
    lines = [f"{'batch':<16s} {'workers':>7s} {'threads':>7s} {'explained':>9s} {'wall s':>8s} {'per min':>8s} "
             f"{'item s':>7s} {'Ray start s':>11s}"]
    for m in section["rows"]:
        lines.append(f"{m['row']:<16s} {m['workers']:>7d} {m['threads'] or 0:>7d} {m['explained']:>9d} "
                     f"{m['wall_s']:>8.1f} {m['regions_per_minute']:>8.1f} {m['median_item_s'] or 0:>7.2f} "
                     f"{'' if m['ray_init_s'] is None else format(m['ray_init_s'], '.1f'):>11s}")
    if section["ray_overhead_over_local_2"] is not None:
        lines.append(f"Ray's overhead against the local pool (2 workers each): "
                     f"{section['ray_overhead_over_local_2'] * 100:+.0f} % wall time")
    return lines
