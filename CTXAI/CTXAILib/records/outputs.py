"""The files a run leaves in its output folder, written all together or not at all."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..engine.geometry import write_volume
from .record import run_record, write_json

__all__ = ["write_explanation"]


def write_explanation(result, volume, model, out_dir: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """Write ``attribution.nrrd``, ``confidence.nrrd`` (segmentation) and ``run.json`` into ``out_dir``.

    Files are written to a private staging folder first and moved in only when all succeeded.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ctxai-partial-", dir=out_dir))
    try:
        names = {"attribution": "attribution.nrrd"}
        write_volume(result.attribution, staging / names["attribution"])
        if result.confidence is not None:
            names["confidence"] = "confidence.nrrd"
            write_volume(result.confidence, staging / names["confidence"])
        record = run_record(result, volume, model, outputs=dict(names))
        record.update(extra or {})
        write_json(record, staging / "run.json")
        names["record"] = "run.json"
        written = {}
        for key, name in names.items():
            (staging / name).replace(out_dir / name)
            written[key] = out_dir / name
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
