"""The files a run leaves in its output folder, written all together or not at all.

A run owns its folder: its files replace the previous run's set as a whole, so a folder never mixes two runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from ..engine.geometry import write_volume
from ..errors import OutputError
from .audit import append_entry, audit_entry, log_path
from .record import run_record, write_json

__all__ = ["OUTPUT_NAMES", "claim_output_folder", "write_explanation"]

OUTPUT_NAMES = ("attribution.nrrd", "confidence.nrrd", "run.json")
_STAGING = ".ctxai-partial-"


def _previous_set(out_dir: Path) -> list[str]:
    """The files of the run that wrote ``out_dir`` before: the known names and whatever its record listed."""
    names = set(OUTPUT_NAMES)
    try:
        listed = json.loads((out_dir / "run.json").read_text()).get("outputs", {})
        names.update(v for v in listed.values() if isinstance(v, str) and Path(v).name == v)
    except (OSError, ValueError, AttributeError):
        pass  # no record, or not one of ours: the known names are the set
    return sorted(n for n in names if (out_dir / n).is_file())


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def claim_output_folder(out_dir: str | Path, inputs: Iterable[str | Path | None], overwrite: bool,
                        started: float) -> Path:
    """Check, before any computing, that a run may write its files into ``out_dir``; returns it.

    Refuses a folder that is a file or not writable, an output that would replace one of ``inputs`` (compared as
    resolved paths), and a folder holding another run's files unless ``overwrite``. Removes staging folders that
    runs killed before ``started`` (a ``time.time()``) left behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"Output folder {out_dir} is an existing file. Give a folder path to --out.")
    for path in filter(None, inputs):
        for name in OUTPUT_NAMES:
            if _same_file(out_dir / name, Path(path)):
                raise OutputError(f"Output {out_dir / name} would replace input {path}. Choose another --out "
                                  "folder, or rename the input.")
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=_STAGING, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"Output folder {out_dir} cannot be written ({exc.strerror} in {existing}). Choose a "
                          "writable --out folder.") from None
    previous = _previous_set(out_dir) if out_dir.is_dir() else []
    if previous and not overwrite:
        raise OutputError(f"Output folder {out_dir} holds another run's files ({', '.join(previous)}). Choose a new "
                          "--out folder, or pass --overwrite to replace that run's files as a whole.")
    if out_dir.is_dir():
        for stale in out_dir.glob(_STAGING + "*"):
            if stale.is_dir() and stale.stat().st_mtime < started:
                shutil.rmtree(stale, ignore_errors=True)
    return out_dir


def write_explanation(result, volume, model, out_dir: str | Path, extra: dict | None = None, *,
                      sources: dict[str, str | Path | None] | None = None,
                      audit_log: str | Path | None = None) -> dict[str, Path]:
    """Write ``attribution.nrrd``, ``confidence.nrrd`` (segmentation) and ``run.json`` into ``out_dir``, and append
    the run to the audit log (``audit_log``, else :func:`~CTXAILib.records.audit.log_path` beside ``out_dir``).

    ``sources`` are the files the run read, recorded with their hashes (see :func:`~.record.run_record`). Files
    are written to a private staging folder first and moved in only when all succeeded; the previous run's files
    leave the folder in the same step. A write failure raises :class:`OutputError` and changes nothing.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=out_dir))
    except OSError as exc:
        raise OutputError(f"Could not create output folder {out_dir}: {exc.strerror}. Choose a writable --out "
                          "folder.") from None
    try:
        names = {"attribution": "attribution.nrrd"}
        write_volume(result.attribution, staging / names["attribution"])
        if result.confidence is not None:
            names["confidence"] = "confidence.nrrd"
            write_volume(result.confidence, staging / names["confidence"])
        record = run_record(result, volume, model, outputs=dict(names), sources=sources)
        record.update(extra or {})
        write_json(record, staging / "run.json")
        names["record"] = "run.json"
        log = log_path(audit_log, out_dir)
        # Hashed in staging: the entry is ready before the run's files replace the previous run's.
        entry = audit_entry(record, {key: staging / name for key, name in names.items()})
        _swap_in(staging, out_dir, list(names.values()))
    except (OSError, RuntimeError) as exc:  # SimpleITK reports a full disk as RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[-1]
        raise OutputError(f"Could not write the outputs into {out_dir}: {reason}. Nothing was changed there; free "
                          "some space or choose another --out folder.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written = {key: out_dir / name for key, name in names.items()}
    for key, path in written.items():
        entry["outputs"][key]["path"] = str(path.absolute())
    try:
        append_entry(log, entry)
    except OutputError as exc:
        raise OutputError(f"The run's files are in {out_dir}, but it is not in the audit log: {exc}") from None
    return written


def _swap_in(staging: Path, out_dir: Path, names: list[str]) -> None:
    # The previous set waits inside the staging folder, so that a killed run leaves one folder to clean up.
    aside = staging / "previous"
    aside.mkdir()
    previous = _previous_set(out_dir)
    moved: list[str] = []
    try:
        for name in previous:
            (out_dir / name).replace(aside / name)
        for name in names:
            (staging / name).replace(out_dir / name)
            moved.append(name)
    except OSError:
        for name in moved:
            (out_dir / name).unlink(missing_ok=True)
        for name in previous:
            (aside / name).replace(out_dir / name)
        raise
