"""The benchmark's run in the parent process: the machine, the phantoms and cards, a memory and a timing child per
case, the report's rows, U-Net scaling and criteria, and the report as a text table."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InputError
from .cases import (BATCHES, BENCH_SEED, LOAD_PROCESSES, MEMORY_BOUNDS, MEMORY_SCENARIOS, OCCLUSION_PATCH,
                    QUICK_BATCHES, UNET_METHODS_CUDA, UNET_SHAPES, Case, plan_cases, select_cases)
from .batch import BATCH_ROWS, format_batch, run_batch_rows
from .children import run_child
from .measure import competing_load
from .nnunet_cam import NNUNET_ROWS, format_nnunet, run_nnunet_cam

__all__ = ["run_bench", "format_table"]


def _machine(device, precision: str) -> dict[str, Any]:
    import psutil
    import torch

    from ..records.record import library_versions

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(), "versions": library_versions(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "precision": precision, "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _pick_defect(phantom, patch: int) -> tuple[list[int], str, dict[str, Any]]:
    """The voxel and classifier class of the largest pore-class defect whose centred patch fits in the volume
    (another defect class only where the phantom has no pore)."""
    from ..synthetic.training import CLASSIFIER_CLASSES, TYPE_TO_CLASS

    size = phantom.ct.shape[::-1]

    def centre(defect) -> list[int]:
        return [int(round(c)) for c in defect.centre]

    def fits(defect) -> bool:
        return all(patch // 2 <= c <= n - patch // 2 for c, n in zip(centre(defect), size))

    if not phantom.defects:
        raise InputError(f"The benchmark phantom (seed {phantom.seed}) has no defect to explain.")
    chosen = max(phantom.defects, key=lambda d: (TYPE_TO_CLASS[d.type] == 1, fits(d), d.voxel_count))
    return centre(chosen), CLASSIFIER_CLASSES[TYPE_TO_CLASS[chosen.type]], chosen.to_dict()


def _repeated(ct: str, size: int, folder: Path) -> str:
    """The phantom at ``ct`` repeated along each axis into a part of ``size``³ voxels, written uncompressed."""
    import numpy as np

    from ..engine.geometry import Volume, read_volume, write_volume

    volume = read_volume(ct)
    reps = [-(-size // n) for n in volume.shape]
    array = np.ascontiguousarray(np.tile(volume.array, reps)[:size, :size, :size])
    folder.mkdir()
    return str(write_volume(Volume(array, volume.spacing, volume.origin, volume.directions), folder / "ct.nrrd",
                            compress=False))


def _median(measure: dict[str, Any] | None) -> float | None:
    return statistics.median(measure["times_s"]) if measure and measure.get("times_s") else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _against_key(case: str, against: str) -> str:
    """The ratio key of a variant against the case's first: ``engine_over_exhaustive`` for occlusion."""
    return f"engine_over_{against.removeprefix(case + '-')}"


def _row(case: Case, variant: dict[str, Any], memory: dict[str, Any], memory_rss: float, timing: dict[str, Any],
         timing_rss: float, models: dict[str, str]) -> dict[str, Any]:
    row = variant["row"]
    measures = timing["measures"]
    engine = measures[f"engine:{row}"]
    entry = {
        "name": row, "case": case.name, "model": models[case.model], "method": case.method,
        "settings": timing["settings"][row], "input_shape_kji": [case.shape] * 3,
        "extent_shape_kji": timing["extent_shape_kji"], "tiles": timing["tiles"], "target": case.target,
        "layer": timing["layer"],
        "engine": {"median_s": _median(engine), **engine, "model_samples_per_run": timing["model_samples"][row],
                   "model_samples_estimate": timing["samples_estimate"], "peak_rss_mib": memory_rss,
                   "rss_before_run_mib": memory["rss_before_run_mib"], "cold_run_s": memory["cold_s"],
                   "cold_run_model_samples": memory["model_samples"],
                   "cold_run_cuda_peak_mib": memory["cuda_peak_mib"]},
        "limit": {"median_s": _median(measures["limit"]), **measures["limit"]},
        "references_peak_rss_mib": timing_rss, "competing_processes": case.load,
    }
    for key in ("captum", "monai"):
        entry[key] = ({"median_s": _median(measures[key]), **measures[key]} if key in measures
                      else {"skipped": timing["skipped"][key]})
    e = entry["engine"]["median_s"]
    entry["ratios"] = {f"engine_over_{key}": _ratio(e, entry[key].get("median_s"))
                       for key in ("limit", "captum", "monai")}
    check = timing["map_checks"].get(row)
    if check is not None:
        entry["map_check"] = check
        entry["ratios"][_against_key(case.name, check["against"])] = _ratio(
            e, _median(measures[f"engine:{check['against']}"]))
    return entry


def _memory_row(case: Case, memory: dict[str, Any], rss: float) -> dict[str, Any]:
    return {"name": case.name, "case": case.name, "model": "U-Net (64³ tiles, abutting)", "method": case.method,
            "memory_only": True, "input_shape_kji": [case.shape] * 3, "target": case.target,
            "volume_mib": memory["volume_mib"],
            "engine": {"peak_rss_mib": rss, "rss_before_run_mib": memory["rss_before_run_mib"],
                       "cold_run_s": memory["cold_s"], "cold_run_model_samples": memory["model_samples"],
                       "cold_run_cuda_peak_mib": memory["cuda_peak_mib"]}}


_MEMORY_BASE = min(size for sizes in MEMORY_SCENARIOS.values() for size, _ in sizes)  # the phantom repeated


def _memory_scaling(rows: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per scenario, the large part's peak beyond the small one's (the model's working set), in volumes of the
    large part; ``comparable`` is False when the two runs of a scenario that should do the same model work did not
    (their difference would then be that work's memory, not the part's)."""
    out = {}
    for scenario, ((small_size, _), (large_size, _)) in MEMORY_SCENARIOS.items():
        small, large = rows.get(f"memory-{scenario}{small_size}"), rows.get(f"memory-{scenario}{large_size}")
        if small is None or large is None:
            continue
        beyond = large["engine"]["peak_rss_mib"] - small["engine"]["peak_rss_mib"]
        samples = [small["engine"]["cold_run_model_samples"], large["engine"]["cold_run_model_samples"]]
        out[scenario] = {"peak_rss_mib": [small["engine"]["peak_rss_mib"], large["engine"]["peak_rss_mib"]],
                         "volume_mib": large["volume_mib"], "beyond_working_set_mib": beyond,
                         "beyond_working_set_over_volume": beyond / large["volume_mib"], "model_samples": samples,
                         "comparable": scenario != "roi" or samples[0] == samples[1]}
    return out


def _criterion(text: str, value: float | None, relation: str, bound, missing: str, note: str | None) -> dict:
    if value is None:
        passed = None
    elif relation == "<=":
        passed = value <= bound
    elif relation == ">=":
        passed = value >= bound
    else:
        passed = bound[0] <= value <= bound[1]
    entry = {"criterion": text, "value": value, "relation": relation, "bound": bound, "pass": passed}
    if value is None:
        entry["note"] = missing
    elif note:
        entry["note"] = note
    return entry


def _criteria(rows: dict[str, dict], scaling: list[dict], quick: bool, memory: dict | None = None
              ) -> list[dict[str, Any]]:
    note = "quick mode: reduced settings, not the issue's; no verdict on its targets" if quick else None

    def ratio(row: str, key: str) -> tuple[float | None, str]:
        return (rows[row]["ratios"].get(key) if row in rows else None), f"not measured: row {row} did not run"

    checks = [("Grad-CAM ≤ 1.3× limit", *ratio("classifier-gradcam", "engine_over_limit"), "<=", 1.3)]
    for method, label in (("integrated_gradients", "Integrated Gradients"), ("smoothgrad", "SmoothGrad"),
                          ("gradient_shap", "GradientSHAP")):
        row = f"classifier-{method}"
        checks.append((f"{label} ≤ 1.2× limit", *ratio(row, "engine_over_limit"), "<=", 1.2))
        checks.append((f"{label} ≤ 1.0× Captum", *ratio(row, "engine_over_captum"), "<=", 1.0))
    checks.append(("exhaustive occlusion ≤ 1.0× MONAI", *ratio("occlusion-exhaustive", "engine_over_monai"),
                   "<=", 1.0))
    loaded, missing = ratio("classifier-integrated_gradients-loaded", "engine_over_limit")
    checks.append((f"Integrated Gradients under load ({LOAD_PROCESSES} busy processes) ≤ 1.5× limit", loaded,
                   missing, "<=", 1.5))
    speed, missing = ratio("occlusion-incremental", "engine_over_monai")
    checks.append(("incremental occlusion ≥ 5× faster than MONAI", None if speed is None else 1.0 / speed,
                   missing, ">=", 5.0))
    map_check = rows.get("occlusion-incremental", {}).get("map_check")
    checks.append(("incremental occlusion map = exhaustive (max abs difference / range ≤ 1e-4)",
                   map_check["max_abs_difference_over_range"] if map_check else None,
                   "not measured: needs both occlusion rows", "<=", 1e-4))
    for item in scaling:
        checks.append((f"U-Net {item['method']}: peak RSS 256³/128³ ≤ 1.25", item["peak_rss_ratio"], "", "<=",
                       1.25))
        checks.append((f"U-Net {item['method']}: time 256³/128³ within ±20 % of the voxel ratio (8)",
                       item["time_ratio"], "", "between", [6.4, 9.6]))
    for scenario, ((small, _), (large, _)) in MEMORY_SCENARIOS.items():
        item = (memory or {}).get(scenario)
        missing = f"not measured: needs memory-{scenario}{small} and memory-{scenario}{large}"
        if item and not item["comparable"]:
            missing = (f"not comparable: the runs made {item['model_samples'][0]} and {item['model_samples'][1]} "
                       "model samples, so their difference is not the part's memory")
        where = "one voxel of a" if scenario == "roi" else "a whole"
        checks.append((f"U-Net saliency of {where} {large}³ part: peak RSS ≤ {MEMORY_BOUNDS[scenario]:g}× its "
                       f"float32 volume + the working set (the {small}³ run's peak)",
                       item["beyond_working_set_over_volume"] if item and item["comparable"] else None, missing, "<=",
                       MEMORY_BOUNDS[scenario]))
    if not scaling:
        checks.append(("U-Net peak RSS 256³/128³ ≤ 1.25", None, "not measured: needs U-Net rows at 128³ and 256³",
                       "<=", 1.25))
        checks.append(("U-Net time 256³/128³ within ±20 % of the voxel ratio (8)", None,
                       "not measured: needs U-Net rows at 128³ and 256³", "between", [6.4, 9.6]))
    return [_criterion(text, value, relation, bound, missing, note)
            for text, value, missing, relation, bound in checks]


def _scaling(rows: dict[str, dict]) -> list[dict[str, Any]]:
    small, large = UNET_SHAPES
    out = []
    for name in UNET_METHODS_CUDA:
        a, b = rows.get(f"unet{small}-{name}"), rows.get(f"unet{large}-{name}")
        if a is None or b is None:
            continue
        time_ratio = _ratio(b["engine"]["median_s"], a["engine"]["median_s"])
        voxels = (large / small) ** 3
        tiles = b["tiles"] / a["tiles"]
        out.append({"method": name, "peak_rss_mib": [a["engine"]["peak_rss_mib"], b["engine"]["peak_rss_mib"]],
                    "peak_rss_ratio": _ratio(b["engine"]["peak_rss_mib"], a["engine"]["peak_rss_mib"]),
                    "time_s": [a["engine"]["median_s"], b["engine"]["median_s"]], "time_ratio": time_ratio,
                    "voxel_ratio": voxels, "time_ratio_over_voxel_ratio": _ratio(time_ratio, voxels),
                    "tile_ratio": tiles, "time_ratio_over_tile_ratio": _ratio(time_ratio, tiles)})
    return out


_NOTES = [
    "Times are medians over each measure's repeats; on a CPU the heavy measures (256³ U-Net, exhaustive occlusion "
    "and the occlusion references) run once, after a light warm-up (see each measure's warm_up). A heavy engine "
    "row's timed run is then the method's first run in its process and includes what the engine works out on "
    "first use (such as its batch-size probe).",
    "The engine's Explainer is created once per timing child and reused across repeats, as in an analyst's "
    "session. It keeps the last volume's normalised input and its prediction (a segmentation model's "
    "sliding-window probabilities; a classifier's class probabilities per extent), so after the warm-up the rows "
    "time the explanation alone; the confidence rows evict that cache before each run and time the prediction "
    "itself.",
    "Captum and MONAI get the engine's normalised input, the raw network (parameters frozen, as the engine loads "
    "it), and baselines and supervoxels computed outside their timers. On the U-Net they run tile by tile over the "
    "engine's tile grid (Captum on each tile's class logits summed over the voxels, its documented form for "
    "segmentation) and their tiles' maps are added into the volume.",
    "The limit is the registry's estimate of model evaluations × tiles × the raw network's best time per sample. "
    "model_samples_per_run counts the samples of the engine's calls of the whole network (prediction included); "
    "the incremental occlusion engine recomputes layers over the changed region without such calls.",
    "A row named *-loaded is timed (the engine, the limit and the references alike) while competing_processes "
    "busy processes, started and stopped by the benchmark, spin on the CPU: a machine shared with other work.",
    "peak_rss_mib is the peak resident memory of a fresh process that ran the engine once (its baseline before "
    "the run is rss_before_run_mib); references_peak_rss_mib is the timing child's, references included.",
]


def run_bench(out: str | Path, device: str = "auto", precision: str = "fp32", repeats: int = 3,
              quick: bool = False, cases: Sequence[str] | None = None, log: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Run the benchmark, write its JSON report to ``out`` (atomically) and return the report."""
    if not hasattr(os, "wait4"):
        raise InputError("ctxai bench reads each case's peak memory with os.wait4, which this operating system "
                         "lacks; run it on Linux or macOS.")
    from ..engine.methods import get_method
    from ..engine.modelcard import ModelCard
    from ..engine.runtime import autocast, resolve_device
    from ..records.record import write_json
    from ..synthetic.evaluation import bundled_model
    from ..synthetic.phantom import generate_phantom, save_phantom

    if repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {repeats}.")
    resolved = resolve_device(device)
    with autocast(resolved, precision):  # validates the precision name before any work
        pass
    planned, skipped = plan_cases(resolved.type, quick)
    # The batch rows and the nnunet-cam row run only when named: they need Ray, or nnU-Net and the reference
    # environment, and time whole batches or another library's pipeline.
    batch_rows = [row for row in BATCH_ROWS if any(p in row for p in cases or [])]
    nnunet_rows = [row for row in NNUNET_ROWS if any(p in row for p in cases or [])]
    named = BATCH_ROWS + NNUNET_ROWS
    patterns = [p for p in cases or [] if not any(p in row for row in named)]
    if cases and not patterns:
        planned, skipped = [], []
    else:
        planned = select_cases(planned, patterns, skipped, named)
        skipped = [s for s in skipped if not patterns or any(p in s["row"] for p in patterns)]
    for case in planned:
        for variant in case.variants:
            get_method(case.method).validate(variant["settings"])  # a missing setting fails now, not after minutes
    started = time.perf_counter()
    machine = _machine(resolved, precision)
    workdir = Path(tempfile.mkdtemp(prefix="ctxai-bench-"))
    try:
        classifier = bundled_model("classifier")
        data = json.loads(classifier.read_text())
        # One tile of 48³: the same network (it pools globally) and weights, with a larger patch in its card.
        data.update(name=f"{data['name']}-48", patch_size=[OCCLUSION_PATCH] * 3,
                    weights=str(ModelCard.load(classifier).weights_path))
        classifier48 = workdir / "classifier48.json"
        classifier48.write_text(json.dumps(data, indent=2))
        cards = {"classifier": classifier, "classifier48": classifier48, "unet": bundled_model("unet")}
        models = {"classifier": "classifier (32³ patch)", "classifier48": "classifier (its card with a 48³ patch)",
                  "unet": "U-Net (64³ tiles)"}
        phantoms, volumes, targets = [], {}, {}
        memory_only = [case for case in planned if case.memory_only]
        for shape in sorted({case.shape for case in planned if not case.memory_only}
                            | ({_MEMORY_BASE} if memory_only else set())):
            log(f"generating the benchmark phantom (seed {BENCH_SEED}, {shape}³ voxels)")
            phantom = generate_phantom(BENCH_SEED, (shape,) * 3)
            volumes[shape] = str(save_phantom(phantom, workdir / f"phantom{shape}")["ct"])
            phantoms.append({"seed": BENCH_SEED, "shape_kji": [shape] * 3, "part": phantom.part_kind,
                             "defects": len(phantom.defects)})
            if any(case.shape == shape and case.model != "unet" for case in planned):
                voxel, name, defect = _pick_defect(phantom, OCCLUSION_PATCH)
                targets[shape] = {"class": name, "voxel": voxel}
                phantoms[-1]["classifier_target"] = {"class": name, "voxel_ijk": voxel, "defect": defect}
        for size in sorted({case.shape for case in memory_only}):  # all read alike: uncompressed
            volumes[f"memory{size}"] = _repeated(volumes[_MEMORY_BASE], size, workdir / f"memory{size}")
        batches = list(QUICK_BATCHES if quick else BATCHES)
        rows: dict[str, dict] = {}
        for number, case in enumerate(planned, start=1):
            case = replace(case, card=str(cards[case.model]), device=str(resolved),
                           volume=volumes[f"memory{case.shape}" if case.memory_only else case.shape],
                           precision=precision, repeats=1 if quick else repeats, batches=batches,
                           target=targets[case.shape] if case.model != "unet" else
                           {"class": "void",
                            "voxel": [case.shape // 2 - 8] * 3 if case.memory_target == "roi" else None})
            if case.memory_only:
                log(f"[{number}/{len(planned)}] {case.name}: engine memory run (ctxai explain's path)")
                rows[case.name] = _memory_row(case, *run_child("memory", case, workdir))
                continue
            memory = {}
            for index, variant in enumerate(case.variants):
                log(f"[{number}/{len(planned)}] {variant['row']}: engine memory run")
                memory[variant["row"]] = run_child("memory", case, workdir, index)
            log(f"[{number}/{len(planned)}] {case.name}: timing the engine, the limit, Captum and MONAI")
            with competing_load(case.load):
                timing, timing_rss = run_child("timing", case, workdir)
            for variant in case.variants:
                result, rss = memory[variant["row"]]
                rows[variant["row"]] = _row(case, variant, result, rss, timing, timing_rss, models)
        scaling = _scaling(rows)
        memory = _memory_scaling(rows)
        report = {"benchmark": "ctxai bench", "machine": machine,
                  "options": {"repeats": repeats, "quick": quick, "cases": list(cases or []), "batches": batches},
                  "phantoms": phantoms, "notes": _NOTES, "rows": list(rows.values()), "skipped_rows": skipped,
                  "unet_scaling": scaling, "memory_scaling": memory,
                  "criteria": _criteria(rows, scaling, quick, memory) if planned else []}
        if batch_rows:
            report["batch"] = run_batch_rows(batch_rows, workdir, str(resolved), quick, log)
        if nnunet_rows:
            report["nnunet_cam"] = run_nnunet_cam(workdir, repeats, quick, log)
        report["minutes"] = (time.perf_counter() - started) / 60
        write_json(report, out)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_SYMBOLS = {"<=": "≤", ">=": "≥"}


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table: one row per case, then what was skipped and the criteria."""
    header = (f"{'case':<32s} {'engine s':>9s} {'limit s':>9s} {'×limit':>7s} {'Captum s':>9s} {'×Captum':>8s} "
              f"{'MONAI s':>9s} {'×MONAI':>7s} {'peak RSS MiB':>13s}")
    lines = [header, "-" * len(header)] if report["rows"] else []
    notes = []
    for row in report["rows"]:
        if row.get("memory_only"):
            lines.append(f"{row['name']:<32s} {'-':>9s} {'-':>9s} {'-':>7s} {'-':>9s} {'-':>8s} {'-':>9s} {'-':>7s} "
                         f"{_cell(row['engine']['peak_rss_mib'], 0):>13s}")
            notes.append(f"  {row['name']}: memory only, {row['input_shape_kji'][0]}³ float32 part "
                         f"({row['volume_mib']:.0f} MiB), one run in {row['engine']['cold_run_s']:.0f} s")
            continue
        ratios = row["ratios"]
        lines.append(f"{row['name']:<32s} {_cell(row['engine']['median_s']):>9s} {_cell(row['limit']['median_s']):>9s} "
                     f"{_cell(ratios['engine_over_limit'], 2):>7s} {_cell(row['captum'].get('median_s')):>9s} "
                     f"{_cell(ratios['engine_over_captum'], 2):>8s} {_cell(row['monai'].get('median_s')):>9s} "
                     f"{_cell(ratios['engine_over_monai'], 2):>7s} {_cell(row['engine']['peak_rss_mib'], 0):>13s}")
        for key, name in (("captum", "Captum"), ("monai", "MONAI")):
            if "skipped" in row[key]:
                notes.append(f"  {row['name']}: no {name} reference ({row[key]['skipped']})")
        if row.get("competing_processes"):
            quiet = next((r for r in report["rows"] if r["name"] == row["name"].removesuffix("-loaded")), None)
            notes.append(f"  {row['name']}: timed while {row['competing_processes']} busy processes competed for "
                         f"the CPU, the limit too: ×limit {_cell(ratios['engine_over_limit'], 2)} (quiet row "
                         f"{_cell(quiet['ratios']['engine_over_limit'] if quiet else None, 2)})")
        if "map_check" in row:
            check = row["map_check"]
            notes.append(f"  {row['name']}: {_cell(ratios[_against_key(row['case'], check['against'])], 3)}× the "
                         f"time of {check['against']}; max map difference / range = "
                         f"{_cell(check['max_abs_difference_over_range'], 8)}")
    for item in report["skipped_rows"]:
        notes.append(f"  {item['row']}: not run ({item['reason']})")
    for item in report["unet_scaling"]:
        notes.append(f"  U-Net {item['method']} 256³/128³: time ×{_cell(item['time_ratio'], 2)} (voxels ×8, tiles "
                     f"×{_cell(item['tile_ratio'], 2)}), peak RSS ×{_cell(item['peak_rss_ratio'], 2)}")
    for scenario, memory in (report.get("memory_scaling") or {}).items():
        notes.append(f"  memory-{scenario}: peak RSS {memory['peak_rss_mib'][1]:.0f} MiB = the working set "
                     f"({memory['peak_rss_mib'][0]:.0f} MiB) + {memory['beyond_working_set_over_volume']:.2f}× the "
                     f"volume ({memory['volume_mib']:.0f} MiB); model samples {memory['model_samples'][0]} and "
                     f"{memory['model_samples'][1]}")
    if notes:
        lines += ["", "notes:"] + notes
    if "batch" in report:
        lines += ([""] if lines else []) + format_batch(report["batch"])
    if "nnunet_cam" in report:
        lines += ([""] if lines else []) + format_nnunet(report["nnunet_cam"])
    if not report["criteria"]:
        return "\n".join(lines)
    lines += ["", "criteria (measured values, unadjusted):"]
    for item in report["criteria"]:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[item["pass"]]
        bound = (f"{item['bound'][0]:g}..{item['bound'][1]:g}" if item["relation"] == "between"
                 else f"{_SYMBOLS[item['relation']]} {item['bound']:g}")
        value = "not measured" if item["value"] is None else f"{item['value']:.4g}"
        lines.append(f"  {verdict}  {item['criterion']}: {value} (bound {bound})"
                     + (f" [{item['note']}]" if item.get("note") else ""))
    return "\n".join(lines)
