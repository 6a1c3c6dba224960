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
import os
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


class _Table:
    """The batch's rows as they fill in: a scan's regions once it is predicted, an item's run once it is done."""

    def __init__(self, out: Path, batch: dict[str, Any], scans: list[Scan], rule: Policy, task: str,
                 model_sha256: str, methods: dict[str, dict[str, Any]], checks: list[str], seed: int, started: float,
                 audit_log: str):
        self.out, self.batch, self.scans, self.rule, self.task = out, batch, scans, rule, task
        self.audit_log = audit_log
        self.model_sha256, self.methods, self.checks, self.seed, self.started = (model_sha256, methods, checks,
                                                                                  seed, started)
        self.rows: dict[tuple, dict[str, Any]] = {}
        self.scan_info: dict[int, dict[str, Any]] = {}
        self.items: list[tuple[tuple, dict[str, Any]]] = []  # (row slot, explain payload) still to compute
        self.reused = 0

    def _places(self, scan: Scan, outcome: dict[str, Any]) -> list[dict[str, Any]]:
        if self.task == "segmentation":
            return outcome["regions"]
        return [{"defect_id": n, "bbox_ijk": p.get("roi"), "centre_ijk": p.get("point"), "place": p}
                for n, p in enumerate(scan.places, start=1)]

    def add_scan(self, index: int, outcome: dict[str, Any]) -> None:
        """Rows for a predicted (or failed) scan; the picked regions become items unless a run folder has them."""
        scan = self.scans[index]
        sha = outcome.get("input_sha256")
        self.scan_info[index] = {
            "part_id": scan.part_id, "volume": scan.volume, "input_sha256": sha,
            "status": "done" if outcome["ok"] else "failed", "error": outcome.get("error"),
            "regions": len(outcome["regions"]) if outcome["ok"] else None,
            "prediction": f"{scan.part_id}/prediction.json" if outcome["ok"] else None, "seconds": outcome["seconds"]}
        if not outcome["ok"]:
            self.rows[(index, 0, "")] = _row(scan, status="failed", error=outcome["error"], seconds=outcome["seconds"])
            return
        for region in self._places(scan, outcome):
            number = region["defect_id"]
            fields = {k: region.get(k) for k in ("defect_id", "class", "voxels", "centre_ijk", "bbox_ijk",
                                                 "mean_confidence", "max_confidence")}
            fields["input_sha256"] = sha
            selected = ("given" if self.task != "segmentation" else
                        self.rule.select(region["mean_confidence"], sha, number))
            if selected is None:
                self.rows[(index, number, "")] = _row(scan, **fields, status="not_selected")
                continue
            target = ({"class": region["class"], "point": region["point_ijk"]} if self.task == "segmentation"
                      else dict(region["place"]))
            for method, values in self.methods.items():
                key = item_key(sha, self.model_sha256, method, values, self.seed, self.checks, target)
                run_dir = f"{scan.part_id}/defect{number:03d}-{method}"
                row = self.rows[(index, number, method)] = _row(scan, **fields, selected_by=selected, method=method,
                                                                status="pending")
                record = _previous_run(self.out / run_dir, key)
                if record is not None:
                    self.reused += 1
                    _finish(row, run_summary(record), run_dir, self.task)
                    continue
                self.items.append(((index, number, method), {
                    "volume": str(scan.path), "series": scan.series, "spacing": scan.spacing, "method": method,
                    "settings": values, "checks": self.checks, "seed": self.seed, "target": target,
                    "run_dir": str(self.out / run_dir), "started": self.started, "audit_log": self.audit_log,
                    "record": {"key": key, "part_id": scan.part_id, "defect_id": number, "selected_by": selected,
                               "policy": self.rule.to_dict()}}))

    def finish_item(self, index: int, outcome: dict[str, Any]) -> None:
        slot, payload = self.items[index]
        row = self.rows[slot]
        if outcome["ok"]:
            _finish(row, outcome, str(Path(payload["run_dir"]).relative_to(self.out)), self.task)
            row["seconds"] = outcome["seconds"]
        else:
            row.update(status="failed", error=outcome["error"], seconds=outcome["seconds"])

    def save(self) -> None:
        order = list(self.methods)
        rows = [self.rows[k] for k in sorted(self.rows, key=lambda k: (k[0], k[1], order.index(k[2])
                                                                        if k[2] in order else -1))]
        scans = [self.scan_info[n] for n in sorted(self.scan_info)]
        statuses = [r["status"] for r in rows]
        self.batch.update(rows=rows, scans=scans, counts={
            "scans": len(self.scans), "regions": sum(s["regions"] or 0 for s in scans),
            "items": len(self.items) + self.reused, "done": statuses.count("done"), "failed": statuses.count("failed"),
            "skipped": statuses.count("not_selected"), "reused": self.reused})
        _write_table(self.out, self.batch)


def run_batch(model: str | Path, inputs: str | Path, out: str | Path, policy: str = "all",
              methods: Iterable[str] = ("saliency",), checks: Iterable[str] | str | None = None,
              settings: dict[str, Any] | None = None, seed: int = 0, engine: str = "local",
              workers: int | None = None, address: str | None = None, device: str = "auto",
              memory_mb: float | None = None, min_voxels: int = 1, audit_log: str | Path | None = None,
              progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a batch into ``out``; returns what ``batch.json`` holds. See the module docstring.

    ``policy`` is parsed by :class:`.policy.Policy` with ``seed`` (which also seeds sampling methods);
    ``min_voxels`` drops smaller predicted regions; ``workers`` and ``address`` go to the engine
    (:mod:`.engines`). One scan's or item's failure is recorded in its row; the batch goes on.
    """
    from ..checks.runner import resolve_checks
    from ..engine.models import load_model
    from ..records.audit import LOG_ENV, LOG_NAME, claim_log

    started = time.time()
    loaded = load_model(model)  # a bad card or weights stop the batch here, before any worker starts
    card = loaded.card
    chosen = _method_settings(list(methods), dict(settings or {}))
    check_names = resolve_checks(checks, card.task)
    rule = Policy.parse(policy, seed)
    out = Path(out)
    scans = read_inputs(inputs, card.task, exclude=out)
    job = {"model": {"name": card.name, "sha256": loaded.sha256, "path": str(card.path)},
           "policy": rule.to_dict(), "methods": list(chosen), "settings": chosen, "checks": check_names,
           "min_voxels": int(min_voxels)}
    engine_class = get_engine(engine)
    _claim(out, job)
    # One log for the whole batch, inside its folder (every worker appends under the log's lock), checked writable
    # before any scan is predicted so that no item is explained unlogged.
    log = claim_log(audit_log or os.environ.get(LOG_ENV) or out / LOG_NAME)
    batch: dict[str, Any] = {"format": FORMAT, **job, "engine": engine, "started": _now(), "finished": None,
                             "counts": {}, "scans": [], "rows": []}
    table = _Table(out, batch, scans, rule, card.task, loaded.sha256, chosen, check_names, seed, started, str(log))

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
            table.add_scan(index, outcome)
            table.save()
            report(f"predicted {count}/{len(scans)} scan(s)", 0.0)
        items, begun = len(table.items), time.perf_counter()
        for count, (index, outcome) in enumerate(pool.map("explain", [p for _, p in table.items]), start=1):
            table.finish_item(index, outcome)
            table.save()
            failed = sum(r["status"] == "failed" for r in table.rows.values())
            report(f"{count}/{items} item(s) explained, {failed} failed", count / items,
                   (time.perf_counter() - begun) / count * (items - count))
    batch["finished"] = _now()
    table.save()
    return batch


def _finish(row: dict[str, Any], summary: dict[str, Any], run_dir: str, task: str) -> None:
    row.update(status="done", run_dir=run_dir, verdict=summary["verdict"], checks=summary["checks"],
               seconds=summary["run_seconds"], error=None)
    if task != "segmentation":  # a classifier's region has the class and confidence the run predicted
        row.update({"class": summary["class"], "mean_confidence": summary["target_probability"],
                    "max_confidence": summary["target_probability"]})
