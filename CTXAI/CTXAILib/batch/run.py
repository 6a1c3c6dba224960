"""``ctxai batch``: predict every scan, choose regions by a policy, explain them in workers, keep a table.

The batch folder (the contract with ``ctxai report``, see Docs) holds ``batch.json`` and ``batch.csv`` (one row per
region and method, the not-selected regions and failed scans included), and per scan a folder with
``prediction.json`` (its regions) and one run folder per explained item, written by
:func:`CTXAILib.records.outputs.write_explanation` exactly as ``ctxai explain`` writes it.

Resumable and idempotent: an item's key hashes the input, the model, the method, its settings, the seed, the checks
and the target; a run folder whose record holds that key is taken as done, not recomputed. The table is rewritten
atomically after each item, so a killed batch loses at most the items it was computing.

>>> from CTXAILib.batch.run import run_batch                                     # doctest: +SKIP
>>> batch = run_batch("unet.json", "scans/", "out/", policy="confidence<0.9+sample=25%", methods=["saliency"])
...                                                                              # doctest: +SKIP
>>> batch["counts"]                                                              # doctest: +SKIP
{'scans': 4, 'regions': 11, 'items': 5, 'done': 5, 'failed': 1, 'skipped': 6, 'reused': 0}
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..engine.geometry import atomic_output
from ..engine.progress import Progress
from ..errors import OutputError, SettingError
from ..records.record import write_json
from .engines import get_engine
from .inputs import Scan, read_inputs
from .policy import Policy
from .work import run_summary

__all__ = ["FORMAT", "ROW_KEYS", "run_batch", "item_key"]

FORMAT = "ctxai-batch/1"
ROW_KEYS = ("part_id", "volume", "input_sha256", "defect_id", "class", "voxels", "centre_ijk", "bbox_ijk",
            "mean_confidence", "max_confidence", "selected_by", "method", "status", "run_dir", "verdict", "checks",
            "error", "seconds")
_JOB_KEYS = ("model", "policy", "methods", "settings", "checks", "min_voxels")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def item_key(input_sha256: str, model_sha256: str, method: str, settings: dict[str, Any], seed: int,
             checks: Sequence[str], target: dict[str, Any]) -> str:
    """The sha256 that names one explanation: the same key means the same run folder would be written."""
    text = json.dumps({"input": input_sha256, "model": model_sha256, "method": method, "settings": settings,
                       "seed": seed, "checks": list(checks), "target": target}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _method_settings(methods: Sequence[str], settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's validated settings; a setting goes to the methods that have it, and must fit one of them."""
    from ..engine.methods import get_method

    specs = {name: get_method(name) for name in methods}
    known = {name: {s.name for s in spec.settings} for name, spec in specs.items()}
    unused = sorted(set(settings) - set().union(*known.values()))
    if unused:
        raise SettingError(f"Setting(s) {', '.join(map(repr, unused))} belong to none of the methods "
                           f"{', '.join(methods)}. `ctxai methods` lists each method's settings.")
    return {name: spec.validate({k: v for k, v in settings.items() if k in known[name]})
            for name, spec in specs.items()}


def _claim(out: Path, job: dict[str, Any]) -> None:
    """A batch folder is new, or holds this same job (then the batch resumes); never another job's results."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"Batch folder {out} is an existing file. Give a folder path to --out.")
    try:
        previous = json.loads((out / "batch.json").read_text())
    except FileNotFoundError:
        previous = None
    except (OSError, ValueError) as exc:
        raise OutputError(f"Batch folder {out} has an unreadable batch.json ({exc}). Choose a new --out folder, or "
                          "remove that file to start the batch afresh.") from None
    if previous is not None:
        differ = [k for k in _JOB_KEYS if previous.get(k) != json.loads(json.dumps(job[k], default=str))]
        if previous.get("format") != FORMAT or differ:
            raise OutputError(f"Batch folder {out} holds another batch (its {', '.join(differ) or 'format'} "
                              "differ). Choose a new --out folder; the same command resumes its own batch there.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Could not create batch folder {out}: {exc.strerror}. Choose a writable --out "
                          "folder.") from None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):  # the checks: name:pass|fail|n/a
        return ";".join(f"{k}:{ {True: 'pass', False: 'fail'}.get(v, 'n/a') }" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _write_table(out: Path, batch: dict[str, Any]) -> None:
    write_json(batch, out / "batch.json")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(ROW_KEYS)
    for row in batch["rows"]:
        writer.writerow([_cell(row[k]) for k in ROW_KEYS])
    with atomic_output(out / "batch.csv") as tmp:
        tmp.write_text(text.getvalue())


def _row(scan: Scan, **values: Any) -> dict[str, Any]:
    row = dict.fromkeys(ROW_KEYS)
    row.update(part_id=scan.part_id, volume=scan.volume, checks={})
    row.update(values)
    return row


def _previous_run(run_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and (record.get("batch") or {}).get("key") == key else None


def run_batch(model: str | Path, inputs: str | Path, out: str | Path, policy: str = "all",
              methods: Iterable[str] = ("saliency",), checks: Iterable[str] | str | None = None,
              settings: dict[str, Any] | None = None, seed: int = 0, engine: str = "local",
              workers: int | None = None, address: str | None = None, device: str = "auto",
              memory_mb: float | None = None, min_voxels: int = 1,
              progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a batch into ``out``; returns what ``batch.json`` holds. See the module docstring.

    ``policy`` is parsed by :class:`.policy.Policy` with ``seed`` (which also seeds sampling methods);
    ``min_voxels`` drops smaller predicted regions; ``workers`` and ``address`` go to the engine
    (:mod:`.engines`). One scan's or item's failure is recorded in its row; the batch goes on.
    """
    from ..checks.runner import resolve_checks
    from ..engine.models import load_model

    started = time.time()
    loaded = load_model(model)  # a bad card or weights stop the batch here, before any worker starts
    card = loaded.card
    chosen = _method_settings(list(methods), dict(settings or {}))
    check_names = resolve_checks(checks, card.task)
    rule = Policy.parse(policy, seed)
    scans = read_inputs(inputs, card.task)
    out = Path(out)
    job = {"model": {"name": card.name, "sha256": loaded.sha256, "path": str(card.path)},
           "policy": rule.to_dict(), "methods": list(chosen), "settings": chosen, "checks": check_names,
           "min_voxels": int(min_voxels)}
    _claim(out, job)
    engine_class = get_engine(engine)
    batch: dict[str, Any] = {"format": FORMAT, **job, "engine": engine, "started": _now(), "finished": None,
                             "counts": {}, "scans": [], "rows": []}
    rows: dict[tuple, dict[str, Any]] = {}
    scan_info: dict[int, dict[str, Any]] = {}
    items: list[tuple[tuple, dict[str, Any]]] = []
    reused = 0

    def save() -> None:
        ordered = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], list(chosen).index(k[2])
                                                                if k[2] in chosen else -1))]
        batch["rows"] = ordered
        batch["scans"] = [scan_info[n] for n in sorted(scan_info)]
        statuses = [r["status"] for r in ordered]
        batch["counts"] = {"scans": len(scans), "regions": sum(s.get("regions") or 0 for s in batch["scans"]),
                           "items": len(items) + reused, "done": statuses.count("done"),
                           "failed": statuses.count("failed"), "skipped": statuses.count("not_selected"),
                           "reused": reused}
        _write_table(out, batch)

    def report(message: str, fraction: float, eta: float | None = None) -> None:
        if progress is not None:
            progress(Progress(fraction, message, eta))

    setup = {"model": str(card.path), "device": device, "memory_mb": memory_mb}
    with engine_class(setup, workers, address) as pool:
        batch["workers"] = pool.describe()
        report(f"predicting {len(scans)} scan(s) on {pool.workers} worker(s)", 0.0)
        payloads = [dict(scan.payload(), scan_dir=str(out / scan.part_id), min_voxels=int(min_voxels))
                    for scan in scans]
        for count, (index, outcome) in enumerate(pool.map("predict", payloads), start=1):
            scan = scans[index]
            info = {"part_id": scan.part_id, "volume": scan.volume, "input_sha256": outcome.get("input_sha256"),
                    "status": "done" if outcome["ok"] else "failed", "error": outcome.get("error"),
                    "regions": len(outcome.get("regions") or []) if outcome["ok"] else None,
                    "prediction": f"{scan.part_id}/prediction.json" if outcome["ok"] else None,
                    "seconds": outcome["seconds"]}
            scan_info[index] = info
            if not outcome["ok"]:
                rows[(index, 0, "")] = _row(scan, status="failed", error=outcome["error"], seconds=outcome["seconds"])
            else:
                places = outcome["regions"] if card.task == "segmentation" else [
                    {"defect_id": n, "bbox_ijk": p.get("roi"), "centre_ijk": p.get("point"), "place": p}
                    for n, p in enumerate(scan.places, start=1)]
                for region in places:
                    fields = {k: region.get(k) for k in ("defect_id", "class", "voxels", "centre_ijk", "bbox_ijk",
                                                         "mean_confidence", "max_confidence")}
                    fields["input_sha256"] = info["input_sha256"]
                    selected = ("given" if card.task != "segmentation" else
                                rule.select(region["mean_confidence"], info["input_sha256"], region["defect_id"]))
                    if selected is None:
                        rows[(index, region["defect_id"], "")] = _row(scan, **fields, status="not_selected")
                        continue
                    target = ({"class": region["class"], "point": region["point_ijk"]} if card.task == "segmentation"
                              else dict(region["place"]))
                    for method, values in chosen.items():
                        key = item_key(info["input_sha256"], loaded.sha256, method, values, seed, check_names,
                                       target)
                        run_dir = f"{scan.part_id}/defect{region['defect_id']:03d}-{method}"
                        row = _row(scan, **fields, selected_by=selected, method=method, status="pending")
                        rows[(index, region["defect_id"], method)] = row
                        record = _previous_run(out / run_dir, key)
                        if record is not None:
                            reused += 1
                            _finish(row, run_summary(record), run_dir, card.task)
                            continue
                        items.append(((index, region["defect_id"], method), {
                            "volume": str(scan.path), "series": scan.series, "spacing": scan.spacing,
                            "method": method, "settings": values, "checks": check_names, "seed": seed,
                            "target": target, "run_dir": str(out / run_dir), "started": started,
                            "record": {"key": key, "part_id": scan.part_id, "defect_id": region["defect_id"],
                                       "selected_by": selected, "policy": rule.to_dict()}}))
            save()
            report(f"predicted {count}/{len(scans)} scan(s)", 0.0)
        begun, finished = time.perf_counter(), 0
        for index, outcome in pool.map("explain", [payload for _, payload in items]):
            slot, payload = items[index]
            row = rows[slot]
            if outcome["ok"]:
                _finish(row, outcome, str(Path(payload["run_dir"]).relative_to(out)), card.task)
                row["seconds"] = outcome["seconds"]
            else:
                row.update(status="failed", error=outcome["error"], seconds=outcome["seconds"])
            finished += 1
            save()
            elapsed = time.perf_counter() - begun
            failed = sum(r["status"] == "failed" for r in rows.values())
            report(f"{finished}/{len(items)} item(s) explained, {failed} failed", finished / len(items),
                   elapsed / finished * (len(items) - finished))
    batch["finished"] = _now()
    save()
    return batch


def _finish(row: dict[str, Any], summary: dict[str, Any], run_dir: str, task: str) -> None:
    row.update(status="done", run_dir=run_dir, verdict=summary["verdict"], checks=summary["checks"],
               seconds=summary["run_seconds"], error=None)
    if task != "segmentation":  # a classifier's region has the class and confidence the run predicted
        row.update({"class": summary["class"], "mean_confidence": summary["target_probability"],
                    "max_confidence": summary["target_probability"]})
