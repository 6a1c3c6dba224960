"""The benchmark's child processes (``python -m CTXAILib.bench --child ...``): the *memory* child runs the engine
once in a fresh process, the *timing* child times the engine, the limit, Captum and MONAI; :func:`run_child` starts
one from the parent and reads its result and peak memory."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import errors
from ..errors import CTXAIError
from .cases import Case
from .measure import Limit, Measure, counting, elapsed, own_peak_mib, rss_mib
from .references import CAPTUM, CAPTUM_MISSING, MONAI, Inputs, Reference, captum_forward, reference_for

if TYPE_CHECKING:
    from ..engine.explain import Explainer
    from ..engine.geometry import Box, Volume
    from ..engine.targets import Target

__all__ = ["child_main", "evict", "run_child"]


def _engine_setup(case: Case) -> tuple[Explainer, Volume, Target, Box | None]:
    """The case's Explainer (created once per child), its volume, target and (classifier) target voxel box."""
    from ..engine.explain import Explainer
    from ..engine.geometry import Box, read_volume
    from ..engine.models import load_model
    from ..engine.targets import BoxRegion, Target

    model = load_model(case.card)
    explainer = Explainer(model, device=case.device, precision=case.precision, overlap=case.overlap,
                          memory_mb=case.memory_mb)
    volume = read_volume(case.volume)
    voxel = case.target.get("voxel")
    if voxel is None:
        return explainer, volume, Target(case.target["class"]), None
    box = Box(voxel, [v + 1 for v in voxel])
    return explainer, volume, Target(case.target["class"], region=BoxRegion(box)), box


def evict(explainer: Explainer) -> None:
    """Make the next run predict afresh: the Explainer keeps only the last volume it prepared."""
    import numpy as np

    from ..engine.geometry import Volume

    explainer.prepare(Volume(np.zeros((1, 1, 1), np.float32)))


def _memory_child(case: Case, variant: dict[str, Any]) -> dict[str, Any]:
    """One cold engine run in a fresh process: the parent reads the process's peak resident memory."""
    import resource

    import torch

    explainer, volume, target, _box = _engine_setup(case)
    before = own_peak_mib() or rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if explainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(explainer.device)
    counts: list[int] = []
    with counting(explainer.model.module, counts):
        seconds, result = elapsed(lambda: explainer.explain(volume, case.method, target,
                                                            settings=variant["settings"]), explainer.device)
    if case.memory_only:  # ctxai explain's path to its end: the run's files are written too
        from ..records.outputs import write_explanation

        write_explanation(result, volume, explainer.model, Path(case.volume).parent / f"{case.name}-out")
    cuda = (torch.cuda.max_memory_allocated(explainer.device) / 2**20 if explainer.device.type == "cuda" else None)
    return {"cold_s": seconds, "model_samples": sum(counts), "rss_before_run_mib": before, "cuda_peak_mib": cuda,
            "volume_mib": volume.array.size * 4 / 2**20}


def _engine_measure(explainer: Explainer, volume: Volume, target: Target, case: Case, variant: dict[str, Any],
                    samples: list[int], maps: dict[str, Any], prime: Callable[[], None]) -> Measure:
    """The engine's run of one variant; a prediction row evicts the cached prediction first, to time it."""
    from ..engine.methods import get_method

    row, device = variant["row"], explainer.device
    prediction = get_method(case.method).family == "prediction"

    def run() -> float:
        if prediction:
            evict(explainer)
        counts: list[int] = []
        with counting(explainer.model.module, counts):
            seconds, result = elapsed(lambda: explainer.explain(volume, case.method, target,
                                                                settings=variant["settings"]), device)
        samples.append(sum(counts))
        maps[row] = result.attribution.array
        return seconds

    heavy = device.type == "cpu" and variant["heavy"]
    return Measure(f"engine:{row}", run, prime if heavy else run,
                   "the prediction pass only" if heavy else "one full run", 1 if heavy else case.repeats)


def _reference_measure(key: str, reference: Reference, x, extent: Box, tiles: list[Box], case: Case,
                       device) -> Measure:
    """A library's reference on the engine's normalised input ``x`` (1, C, K, J, I): on the extent at once, or tile
    by tile with the tiles' maps added into the extent."""
    import numpy as np

    from ..engine.runtime import autocast
    from ..engine.sliding import TileGrid, crop_padded

    def call(chosen: list) -> float:
        def job():
            if not reference.per_tile:
                with autocast(device, case.precision):
                    return reference.fn(crop_padded(x, extent).to(device), extent).detach().float().cpu()
            total = np.zeros((x.shape[1],) + extent.shape, np.float32)
            for tile in chosen:
                with autocast(device, case.precision):
                    attribution = reference.fn(crop_padded(x, tile).to(device), tile)
                TileGrid.accumulate(total, extent, tile, attribution.detach().float().cpu().numpy()[0])
            return total

        return elapsed(job, device)[0]

    light = device.type == "cpu" and case.heavy_references
    if light and not reference.per_tile:
        warm, warm_up = None, "none (one long call; the limit's batch search warmed the network)"
    elif light:
        warm, warm_up = (lambda: call(tiles[:1])), "the first tile only"
    else:
        warm, warm_up = (lambda: call(tiles)), "one full run"
    return Measure(key, lambda: call(tiles), warm, warm_up, 1 if light else case.repeats,
                   extra={"call": reference.call})


def _timing_child(case: Case) -> dict[str, Any]:
    """Warm up, then time the engine's variants, the limit, Captum and MONAI, interleaved per repeat."""
    import numpy as np
    import torch

    from ..engine.geometry import Box
    from ..engine.methods import get_method
    from ..engine.sliding import TileGrid, crop_padded

    explainer, volume, target, box = _engine_setup(case)
    device, model, card = explainer.device, explainer.model, explainer.model.card
    spec = get_method(case.method)
    segmentation = card.task == "segmentation"
    prepared = explainer.prepare(volume)
    extent = Box.whole(volume.shape) if segmentation else explainer.patch_extent(box, volume.shape)
    tiles = TileGrid(volume.shape, card.patch_shape, explainer.overlap, extent).tiles
    class_index = card.class_index(case.target["class"])

    def prime() -> None:
        if segmentation:
            explainer.segmentation_probabilities(explainer.prepare(volume))
        else:
            explainer.class_probabilities(explainer.prepare(volume), extent)

    settings = {row: spec.validate(v["settings"]) for row, v in zip(case.rows, case.variants)}
    samples: dict[str, list[int]] = {row: [] for row in case.rows}
    maps: dict[str, Any] = {}
    measures = [_engine_measure(explainer, volume, target, case, variant, samples[variant["row"]], maps, prime)
                for variant in case.variants]

    values = settings[case.rows[0]]  # the variants differ in the engine's own settings only
    estimate = spec.samples(values, extent.shape) * len(tiles)
    limit = Limit(model.module, crop_padded(prepared.x, tiles[0]).to(device), class_index, spec.needs_gradient,
                  estimate, case.batches, device, case.precision)
    limit_measure = Measure("limit", limit.run, limit.search, "the batch-size search", case.repeats)
    measures.append(limit_measure)

    layer_name = model.default_layer() if spec.needs_layer else None
    inputs = Inputs(network=model.module, forward=captum_forward(model.module, segmentation),
                    layer=model.get_layer(layer_name) if layer_name else None, layer_name=layer_name,
                    class_index=class_index, values=values, x=crop_padded(prepared.x, extent), extent=extent,
                    patch=card.patch_shape, air=prepared.air, spacing=volume.spacing, overlap=explainer.overlap,
                    segmentation=segmentation, device=device)
    skipped = {}
    for key, library, missing, name in (("captum", CAPTUM, CAPTUM_MISSING, "Captum"),
                                        ("monai", MONAI, {}, "MONAI")):
        reference = reference_for(library, missing, name, spec.label, case.method, inputs)
        if isinstance(reference, str):
            skipped[key] = reference
        else:
            measures.append(_reference_measure(key, reference, prepared.x, extent, tiles, case, device))

    for measure in measures:
        if measure.warm is not None:
            measure.warm()
    for counts in samples.values():
        counts.clear()  # the warm-up's own runs are not reported
    for repeat in range(max(m.repeats for m in measures)):
        for measure in measures:
            if repeat < measure.repeats:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                measure.times.append(measure.run())
                if device.type == "cuda":
                    measure.cuda_peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    limit_measure.extra.update(limit.describe())

    checks = {}
    first = case.rows[0]
    for row in case.rows[1:]:
        span = float(maps[first].max() - maps[first].min())
        difference = float(np.abs(maps[row] - maps[first]).max())
        checks[row] = {"against": first, "max_abs_difference": difference, "range": span,
                       "max_abs_difference_over_range": difference / span if span > 0 else None}
    return {"settings": settings, "extent_shape_kji": list(extent.shape), "tiles": len(tiles),
            "class_index": class_index, "layer": layer_name, "samples_estimate": estimate,
            "model_samples": samples, "measures": {m.key: m.report() for m in measures}, "skipped": skipped,
            "map_checks": checks}


def child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m CTXAILib.bench", description="one benchmark child (private)")
    parser.add_argument("--child", choices=("memory", "timing"), required=True)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--variant", type=int, default=0)
    args = parser.parse_args(argv)
    case = Case(**json.loads(args.spec.read_text()))
    try:
        result = (_memory_child(case, case.variants[args.variant]) if args.child == "memory"
                  else _timing_child(case))
    except CTXAIError as exc:
        args.result.write_text(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}))
        return 2
    result["own_peak_rss_mib"] = own_peak_mib()
    args.result.write_text(json.dumps(result))
    return 0


def run_child(kind: str, case: Case, workdir: Path, variant: int = 0) -> tuple[dict[str, Any], float]:
    """Run one child to its end; returns its result and its peak resident memory in MiB."""
    stem = workdir / f"{case.name}-{kind}-{variant}"
    spec, result, log = stem.with_suffix(".spec.json"), stem.with_suffix(".result.json"), stem.with_suffix(".log")
    spec.write_text(json.dumps(asdict(case)))
    env = dict(os.environ)
    # The child must run this very engine, whichever CTXAILib the interpreter would otherwise find.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                      env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "CTXAILib.bench", "--child", kind, "--spec", str(spec), "--result", str(result),
               "--variant", str(variant)]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env=env)
        try:
            _pid, status, usage = os.wait4(process.pid, 0)  # its rusage is the fallback where /proc is missing
        except BaseException:
            process.kill()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    data = json.loads(result.read_text()) if result.exists() else {}
    if "error" in data:
        kind_of_error = getattr(errors, data["error"]["type"], CTXAIError)
        raise kind_of_error(f"Benchmark case {case.name}: {data['error']['message']}")
    if process.returncode != 0 or not data:
        tail = "\n".join(log.read_text().strip().splitlines()[-15:])
        raise CTXAIError(f"The {kind} child of benchmark case {case.name} failed with exit status "
                         f"{process.returncode}:\n{tail}")
    return data, data.get("own_peak_rss_mib") or rss_mib(usage.ru_maxrss)
