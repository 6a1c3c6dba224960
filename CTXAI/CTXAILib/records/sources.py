"""The files a run read, read again from its record (torch-free: the Slicer process writes reports with it)."""

from __future__ import annotations

from typing import Any

from ..engine.geometry import Volume, read_volume

__all__ = ["recorded_volume"]


def recorded_volume(record: dict[str, Any]) -> Volume:
    """Read the volume a run record names again, as the run read it: the same DICOM series, and a TIFF stack at the
    spacing the run used (its tags, or the ``--spacing`` given then)."""
    source = record["input"].get("source") or {}
    spacing = record["input"]["spacing_mm"] if source.get("reader") == "tiff" else None
    return read_volume(record["sources"]["volume"]["path"], series=source.get("series_uid"), spacing=spacing)
