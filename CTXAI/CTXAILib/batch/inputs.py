"""A batch's scans: every volume of a folder, or the rows of a manifest (CSV or JSON).

A manifest row names a ``volume`` (a file, or a folder for a DICOM series or TIFF stack; relative paths are taken
from the manifest's folder) and optionally a ``part_id`` (default: the volume's name without its suffix), a ``mask``
(label volume on the scan's grid), an ``roi`` (``i0,j0,k0,i1,j1,k1``, upper corner exclusive) or a ``point``
(``i,j,k``), and for the readers a DICOM ``series`` (SeriesInstanceUID, when the folder holds several) or a TIFF
stack's ``spacing`` (``sx,sy,sz`` mm, when its tags have none). For a segmentation model a mask, ROI or point
limits the scan's regions to those touching it; for a classifier each row is one item to explain, and several rows
may name one part.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["Scan", "read_inputs", "VOLUME_SUFFIXES"]

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".tif", ".tiff")
_PLACE_KEYS = ("mask", "roi", "point")


@dataclass
class Scan:
    """One scan of the batch: where its volume is, what limits its regions (segmentation) or what to explain on
    it (classifier: ``places``, each ``{"roi": [...]}`` or ``{"point": [...]}``)."""

    part_id: str
    volume: str
    path: Path
    mask: Path | None = None
    roi: list[int] | None = None
    point: list[int] | None = None
    series: str | None = None
    spacing: list[float] | None = None
    places: list[dict[str, list[int]]] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        return {"part_id": self.part_id, "volume": str(self.path), "series": self.series, "spacing": self.spacing,
                "mask": self.mask and str(self.mask), "roi": self.roi, "point": self.point}


def _part_id(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def _numbers(value: Any, kind: type) -> list | None:
    """A manifest cell's numbers (a JSON list, or text split at commas, semicolons or spaces); None for an empty
    cell, [] for one that does not parse."""
    if value is None or value == "":
        return None
    parts = value if isinstance(value, list) else re.split(r"[\s,;]+", str(value).strip())
    try:
        return [kind(v) for v in parts]
    except (TypeError, ValueError):
        return []


def _ints(value: Any, count: int, what: str, where: str) -> list[int] | None:
    numbers = _numbers(value, int)
    if numbers is not None and len(numbers) != count:
        raise InputError(f"{where}: {what} needs {count} integers (i,j,k{',i1,j1,k1' if count == 6 else ''}), got "
                         f"{value!r}. Fix that row of the manifest.")
    return numbers


def _spacing(value: Any, where: str) -> list[float] | None:
    numbers = _numbers(value, float)
    if numbers is not None and (len(numbers) != 3 or not all(0 < v < float("inf") for v in numbers)):
        raise InputError(f"{where}: spacing needs three voxel sizes in mm (sx,sy,sz), got {value!r}. Fix that row "
                         "of the manifest.")
    return numbers


def _folder(folder: Path, exclude: Path | None) -> list[dict[str, Any]]:
    # A batch folder kept inside the input folder is not a scan.
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                     and (exclude is None or p.resolve() != exclude.resolve()))
    rows = [{"volume": p.name} for p in entries
            if p.is_dir() or any(p.name.lower().endswith(s) for s in VOLUME_SUFFIXES)]
    if not rows:
        raise InputError(f"Input folder {folder} holds no volume ({', '.join(VOLUME_SUFFIXES)} files or DICOM/TIFF "
                         "folders). Put the scans there or give a manifest (.csv or .json).")
    return rows


def _manifest(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Manifest {path} cannot be read ({exc}). Give a UTF-8 CSV or JSON file.") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"Manifest {path} is not valid JSON ({exc}). Fix the file.") from None
        rows = data.get("items") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InputError(f"Manifest {path} must be a list of objects (or {{\"items\": [...]}}) with a "
                             "\"volume\" each.")
        return rows
    if path.suffix.lower() == ".csv":
        return [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in
                csv.DictReader(text.splitlines())]
    raise InputError(f"Inputs {path} are neither a folder nor a .csv/.json manifest. Give a folder of volumes or a "
                     "manifest.")


def read_inputs(inputs: str | Path, task: str, exclude: str | Path | None = None) -> list[Scan]:
    """The scans of ``inputs`` (a folder or a manifest) for a model of ``task``, in the order given; a folder's
    entry ``exclude`` (the batch's own output folder) is left out."""
    inputs = Path(inputs)
    if not inputs.exists():
        raise InputError(f"Inputs {inputs} do not exist. Give a folder of volumes or a .csv/.json manifest.")
    rows = _folder(inputs, exclude and Path(exclude)) if inputs.is_dir() else _manifest(inputs)
    base = inputs if inputs.is_dir() else inputs.parent
    scans: dict[str, Scan] = {}
    for number, row in enumerate(rows, start=1):
        where = f"{inputs} row {number}" if not inputs.is_dir() else str(inputs)
        given = str(row.get("volume") or "").strip()
        if not given:
            raise InputError(f"{where} has no volume. Every row of a manifest needs a \"volume\" path.")
        path = Path(given) if Path(given).is_absolute() else base / given
        part_id = str(row.get("part_id") or "").strip() or _part_id(path)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", part_id):
            raise InputError(f"{where}: part ID {part_id!r} cannot name a folder; use letters, digits, '.', '_' and "
                             "'-' only.")
        place = {"roi": _ints(row.get("roi"), 6, "roi", where), "point": _ints(row.get("point"), 3, "point", where)}
        series = str(row.get("series") or "").strip() or None
        spacing = _spacing(row.get("spacing"), where)
        mask = str(row.get("mask") or "").strip()
        mask_path = None if not mask else Path(mask) if Path(mask).is_absolute() else base / mask
        if sum(v is not None for v in (*place.values(), mask_path)) > 1:
            raise InputError(f"{where} gives more than one of mask, roi and point. Keep one per row.")
        if task == "classification":
            if mask_path is not None or not any(v is not None for v in place.values()):
                raise InputError(f"{where}: a classifier explains given places; give each row an roi "
                                 "(i0,j0,k0,i1,j1,k1) or a point (i,j,k) in a manifest.")
            scan = scans.setdefault(part_id, Scan(part_id, given, path, series=series, spacing=spacing))
            if scan.path != path:
                raise InputError(f"{where}: part ID {part_id!r} names two volumes ({scan.volume} and {given}). "
                                 "Give each part one volume.")
            scan.places.append({k: v for k, v in place.items() if v is not None})
            continue
        if part_id in scans:
            raise InputError(f"{where}: part ID {part_id!r} is given twice ({scans[part_id].volume} and {given}). "
                             "Give each scan its own part_id.")
        scans[part_id] = Scan(part_id, given, path, mask_path, place["roi"], place["point"], series, spacing)
    return list(scans.values())
