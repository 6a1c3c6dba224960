"""Volumes with their geometry, IJK boxes, and NRRD input/output.

Arrays are kept in index order ``(k, j, i)`` (slowest to fastest, as numpy, SimpleITK and Slicer's
``arrayFromVolume`` give them). The geometry is stored the way Slicer's ``vtkMRMLVolumeNode`` stores it: spacing
along i, j, k in mm, the RAS position of voxel (0, 0, 0) and the RAS unit direction of each index axis. The 4x4
IJK-to-RAS matrix is computed from those three exactly as Slicer computes it, so a volume that goes from a Slicer
node to the engine and back keeps its matrix to the last bit. LPS (files, ITK) and RAS differ by the sign of the
first two rows, and a sign change is exact in floating point.

Besides single image files, :func:`read_volume` reads folders of slices (a DICOM series, TIFF slices) and
multi-page TIFF files, and :func:`write_volume` writes DICOM series and TIFF stacks (see :mod:`.slices`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError, OutputError, RegionError
from .files import regular_file
from .nrrd import NRRD_TYPES, write_nrrd
from .slices import (TIFF_SUFFIXES, Slices, check_given_spacing, image_array, is_single_dicom_slice,
                     looks_like_dicom, read_slice_folder, read_tiff_file, write_dicom_series, write_tiff_stack)

__all__ = ["Box", "PlacedVolume", "Volume", "read_volume", "write_volume", "atomic_output"]

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Box:
    """An axis-aligned box of voxels: ``lo`` inclusive, ``hi`` exclusive, both in (i, j, k) order.

    >>> box = Box((2, 0, 1), (6, 4, 3))
    >>> box.size
    (4, 4, 2)
    >>> box.slices  # numpy slices in (k, j, i) order
    (slice(1, 3, None), slice(0, 4, None), slice(2, 6, None))
    """

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", tuple(int(v) for v in self.lo))
        object.__setattr__(self, "hi", tuple(int(v) for v in self.hi))
        if len(self.lo) != 3 or len(self.hi) != 3:
            raise RegionError(f"An IJK box needs three lower and three upper indices, got lo={self.lo} hi={self.hi}.")

    @classmethod
    def from_corners(cls, values: Sequence[int]) -> Box:
        """Build from ``i0, j0, k0, i1, j1, k1`` (upper corner exclusive), as the CLI's ``--roi`` takes it."""
        if len(values) != 6:
            raise RegionError(
                f"An ROI box needs six integers i0,j0,k0,i1,j1,k1, got {len(values)} values: {list(values)}."
            )
        return cls(tuple(values[:3]), tuple(values[3:]))

    @classmethod
    def whole(cls, shape_kji: Sequence[int]) -> Box:
        """The box covering a whole array of shape (k, j, i)."""
        return cls((0, 0, 0), tuple(int(s) for s in reversed(shape_kji[-3:])))

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(h - l for l, h in zip(self.lo, self.hi))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The box's size in array order (k, j, i)."""
        return tuple(reversed(self.size))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Numpy slices selecting the box from a (k, j, i) array."""
        return tuple(slice(l, h) for l, h in zip(reversed(self.lo), reversed(self.hi)))

    @property
    def empty(self) -> bool:
        return any(h <= l for l, h in zip(self.lo, self.hi))

    def grow(self, margin: Sequence[int] | int) -> Box:
        m = (margin,) * 3 if isinstance(margin, (int, np.integer)) else tuple(margin)
        return Box(tuple(l - d for l, d in zip(self.lo, m)), tuple(h + d for h, d in zip(self.hi, m)))

    def clip(self, shape_kji: Sequence[int]) -> Box:
        limit = tuple(reversed(shape_kji[-3:]))
        return Box(
            tuple(min(max(l, 0), n) for l, n in zip(self.lo, limit)),
            tuple(min(max(h, 0), n) for h, n in zip(self.hi, limit)),
        )

    def offset(self, delta: Sequence[int]) -> Box:
        """The box moved by ``delta`` (i, j, k); ``box.offset(-outer.lo)`` gives it relative to ``outer``."""
        return Box(tuple(l + d for l, d in zip(self.lo, delta)), tuple(h + d for h, d in zip(self.hi, delta)))

    def intersect(self, other: Box) -> Box:
        return Box(tuple(map(max, self.lo, other.lo)), tuple(map(min, self.hi, other.hi)))

    def contains(self, other: Box) -> bool:
        return all(a <= b for a, b in zip(self.lo, other.lo)) and all(a >= b for a, b in zip(self.hi, other.hi))

    def check_inside(self, shape_kji: Sequence[int], what: str = "ROI") -> None:
        """Raise :class:`RegionError` unless the box is non-empty and overlaps a volume of this shape."""
        if self.empty:
            raise RegionError(
                f"The {what} box lo={self.lo} hi={self.hi} (i,j,k) is empty: every upper index must exceed its "
                "lower index. Redraw the ROI with a non-zero size along each axis."
            )
        limit = tuple(reversed(shape_kji[-3:]))
        if self.clip(shape_kji).empty:
            raise RegionError(
                f"The {what} box lo={self.lo} hi={self.hi} (i,j,k) lies outside the volume, whose voxels run from "
                f"(0,0,0) to {tuple(n - 1 for n in limit)}. Move the ROI onto the volume or pick the right volume."
            )


@dataclass
class Volume:
    """A scalar (k, j, i) or multi-channel (c, k, j, i) array with the geometry of a Slicer volume node.

    >>> import numpy as np
    >>> v = Volume(np.zeros((4, 5, 6), np.float32), spacing=(0.5, 0.5, 2.0), origin=(10.0, 0.0, 0.0))
    >>> v.ijk_to_ras[:3, 3].tolist(), v.ijk_to_ras[2, 2]
    ([10.0, 0.0, 0.0], 2.0)
    >>> v.crop(Box((1, 1, 1), (3, 3, 3))).origin
    (10.5, 0.5, 2.0)
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    directions: np.ndarray = field(default_factory=lambda: np.eye(3))
    #: What :func:`read_volume` read (``reader``, ``path`` and the reader's details), for run records; None for a
    #: volume made in memory. Derived volumes (``with_array``, ``crop``) do not carry it.
    source: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.directions = np.array(self.directions, dtype=np.float64).reshape(3, 3)
        if self.array.ndim not in (3, 4):
            raise InputError(
                f"A volume must be a 3-D array (k, j, i) or a 4-D array (channels, k, j, i); got shape "
                f"{self.array.shape}. Load a 3-D image (a single 2-D slice or a time series cannot be explained)."
            )
        if any(s <= 0 or not np.isfinite(s) for s in self.spacing):
            raise InputError(f"Voxel spacing must be positive and finite, got {self.spacing} mm. Fix the file header.")

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> Volume:
        """Build from a 4x4 IJK-to-RAS matrix (spacing = column lengths, directions = normalised columns)."""
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        return cls(array, tuple(spacing), tuple(m[:3, 3]), m[:3, :3] / spacing)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape in array order (k, j, i)."""
        return tuple(self.array.shape[-3:])

    @property
    def channels(self) -> int:
        return 1 if self.array.ndim == 3 else self.array.shape[0]

    @property
    def ijk_to_ras(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.directions * np.asarray(self.spacing)
        m[:3, 3] = self.origin
        return m

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume with the same geometry and another array of the same spatial shape."""
        if tuple(array.shape[-3:]) != self.shape:
            raise InputError(f"Array of shape {array.shape} does not fit a volume of shape {self.shape} (k, j, i).")
        return Volume(array, self.spacing, self.origin, self.directions.copy())

    def check_box(self, box: Box) -> None:
        """Raise :class:`RegionError` unless ``box`` lies inside this volume."""
        box.check_inside(self.shape)
        if not Box.whole(self.shape).contains(box):
            raise RegionError(f"Box lo={box.lo} hi={box.hi} reaches outside the volume of size {self.shape[::-1]} (i,j,k).")

    def crop(self, box: Box) -> Volume:
        """The sub-volume inside ``box`` with its exact geometry (same directions and spacing, moved origin)."""
        self.check_box(box)
        origin = self.ijk_to_ras @ np.array([*box.lo, 1.0])
        return Volume(self.array[(...,) + box.slices].copy(), self.spacing, tuple(origin[:3]), self.directions.copy())

    def embed(self, sub: Volume, box: Box, fill: float = 0.0) -> Volume:
        """Place ``sub`` (a crop of this volume's grid at ``box``) into a full-size array of this geometry."""
        return self.with_array(PlacedVolume(self, sub.array, box, fill, sub.array.dtype).array)

    def ras_to_ijk(self, ras: Sequence[float]) -> np.ndarray:
        """Continuous (i, j, k) index of a RAS point."""
        return (np.linalg.inv(self.ijk_to_ras) @ np.array([*ras, 1.0]))[:3]

    def same_geometry(self, other: Volume) -> bool:
        return self.shape == other.shape and np.array_equal(self.ijk_to_ras, other.ijk_to_ras)


class PlacedVolume(Volume):
    """A full-size volume of ``whole``'s geometry that is the array ``sub`` inside ``box`` and ``fill`` elsewhere, as
    ``dtype``; kept as those parts until its ``array`` is first read (then made once), and written to NRRD slab by
    slab from them. A run's confidence over a predicted box in a whole part would otherwise be a part-sized array
    of NaN, and a whole-volume confidence a float32 copy of the float16 prediction, held until its file is written.
    """

    def __init__(self, whole: Volume, sub: np.ndarray, box: Box, fill: float = 0.0, dtype: type = np.float32):
        whole.check_box(box)
        if tuple(sub.shape[-3:]) != box.shape or sub.ndim not in (3, 4):
            raise InputError(f"An array of shape {sub.shape} does not fill a box of shape {box.shape} (k, j, i).")
        self.spacing, self.origin, self.source = whole.spacing, whole.origin, None
        self.directions = whole.directions.copy()
        self.sub, self.box, self.fill, self.dtype = sub, box, float(fill), np.dtype(dtype)
        self._shape, self._array = whole.shape, None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = self.slab(0, self._shape[0])
        return self._array

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def channels(self) -> int:
        return 1 if self.sub.ndim == 3 else self.sub.shape[0]

    def slab(self, k0: int, k1: int) -> np.ndarray:
        """The array's k-slices ``k0:k1`` ((k, j, i), or (c, k, j, i)), made from the parts."""
        shape = self.sub.shape[:-3] + (k1 - k0,) + self._shape[1:]
        # np.zeros leaves the pages outside ``box`` untouched: a map of a small extent in a whole part costs the
        # extent's memory until something reads the rest (the NRRD writer reads it as the shared zero page).
        out = np.zeros(shape, self.dtype) if self.fill == 0 else np.full(shape, self.fill, self.dtype)
        lo, hi = max(k0, self.box.lo[2]), min(k1, self.box.hi[2])
        if lo < hi:
            rows = (slice(lo - k0, hi - k0), self.box.slices[1], self.box.slices[2])
            out[(...,) + rows] = self.sub[..., lo - self.box.lo[2]:hi - self.box.lo[2], :, :]
        return out


def _given_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"A voxel spacing is three positive sizes in mm (sx, sy, sz), got {spacing!r}. Pass it as "
                         "--spacing 0.2,0.2,0.2 (spacing=(0.2, 0.2, 0.2) in read_volume).")
    return values


def _from_slices(slices: Slices) -> Volume:
    return Volume(slices.array, slices.spacing, tuple(np.asarray(slices.origin_lps) * _LPS_TO_RAS),
                  np.asarray(slices.directions_lps) * _LPS_TO_RAS[:, None], source=slices.source)


def read_volume(path: str | os.PathLike, series: str | None = None,
                spacing: Sequence[float] | None = None) -> Volume:
    """Read a volume: an image file (NRRD, NIfTI, MHA, ... anything SimpleITK reads; a multi-page TIFF), a folder
    holding a DICOM series, or a folder of TIFF slices (one per file, in natural name order: 2 before 10).

    Args:
        path: The file or folder.
        series: The SeriesInstanceUID to read from a folder holding several DICOM series.
        spacing: Voxel size (sx, sy, sz) in mm. TIFF stacks take it instead of their tags (needed when they have
            none); files that store their geometry (NRRD, DICOM, ...) must agree with it.

    Returns:
        The :class:`Volume` in RAS, its ``source`` saying what was read (``reader``: ``simpleitk``, ``dicom`` with
        the series UID and slice count, or ``tiff`` with the file count).

    Raises:
        InputError: Unreadable, empty or ambiguous input, named with what to do (see :mod:`.slices`).
    """
    import SimpleITK as sitk

    given = _given_spacing(spacing)
    if Path(path).is_dir():
        return _from_slices(read_slice_folder(Path(path), series, given))
    path = regular_file(path, "Volume file", InputError)
    if series is not None:
        raise InputError(f"--series {series} picks a series from a DICOM folder, but {path} is a file. Give the "
                         "folder holding the series as --volume.")
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _from_slices(read_tiff_file(path, given))
    if looks_like_dicom(path) and is_single_dicom_slice(path):
        raise InputError(f"{path} is one DICOM slice. Give the folder holding its series as --volume.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # ITK says why on its "ITK ERROR: Image(0x...): ..." line; what follows "Refusing" is matrices over lines.
        reason = next((line.split("): ", 1)[-1].split(" Refusing")[0] for line in lines if "ITK ERROR" in line),
                      lines[-1])
        raise InputError(f"Could not read volume {path}: {reason.rstrip('.')}. Is it a complete NRRD/NIfTI/MHA "
                         "file with a valid geometry (spacing, directions)?") from exc
    if image.GetDimension() != 3:
        raise InputError(f"{path} is a {image.GetDimension()}-D image; CTXAI explains 3-D volumes only.")
    if given is not None:
        check_given_spacing(given, image.GetSpacing(), f"file {path}")
    array = image_array(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)  # SimpleITK puts vector components last; the engine wants them first
    directions = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3) * _LPS_TO_RAS[:, None]
    origin = np.array(image.GetOrigin(), dtype=np.float64) * _LPS_TO_RAS
    return Volume(array, image.GetSpacing(), tuple(origin), directions,
                  source={"reader": "simpleitk", "path": str(path)})


class atomic_output:
    """Context manager yielding a private temporary path beside ``path``; renamed onto ``path`` only on success.

    With ``folder=True`` the temporary is a folder (for a DICOM series or a TIFF stack), renamed onto ``path``
    only if ``path`` does not exist or is an empty folder. A failed write leaves neither a partial output nor the
    temporary behind, and whatever was at ``path`` before stays as it was.
    """

    def __init__(self, path: str | os.PathLike, folder: bool = False):
        self.path = Path(path)
        self.folder = folder

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.folder:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
            return self.tmp
        # Keep the real suffix last: SimpleITK picks its writer from it.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix="".join(self.path.suffixes) or ".tmp",
                                   dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            # mkstemp and mkdtemp make private entries; the finished output gets what any new one would get.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, (0o777 if self.folder else 0o666) & ~umask)
            try:
                os.replace(self.tmp, self.path)
            except OSError:
                self._discard()
                raise
        else:
            self._discard()

    def _discard(self) -> None:
        if self.folder:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)


def _write_file(volume: Volume, path: Path, compress: bool) -> None:
    origin, directions = tuple(np.asarray(volume.origin) * _LPS_TO_RAS), volume.directions * _LPS_TO_RAS[:, None]
    placed = isinstance(volume, PlacedVolume) and volume._array is None
    if path.suffix.lower() == ".nrrd" and (volume.dtype if placed else volume.array.dtype) in NRRD_TYPES:
        # Streamed: no volume-sized copy of a map while it is written (nor the whole of a placed one).
        source = (volume.slab, volume.sub.shape[:-3] + volume.shape, volume.dtype) if placed else volume.array
        with atomic_output(path) as tmp:
            write_nrrd(source, volume.spacing, origin, directions, tmp, compress)
        return
    import SimpleITK as sitk

    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    is_vector = array.ndim == 4
    image = sitk.GetImageFromArray(np.moveaxis(array, 0, -1) if is_vector else array, isVector=is_vector)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(directions.ravel()))
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


def _to_slices(volume: Volume) -> Slices:
    return Slices(volume.array, volume.spacing, tuple(np.asarray(volume.origin) * _LPS_TO_RAS),
                  volume.directions * _LPS_TO_RAS[:, None])


#: Formats written as a folder of slices: name -> writer(slices, empty folder).
FOLDER_FORMATS = {"dicom": write_dicom_series, "tiff": write_tiff_stack}


def write_volume(volume: Volume, path: str | os.PathLike, format: str | None = None, compress: bool = True) -> Path:
    """Write a :class:`Volume` atomically: an image file (format from the suffix), or a folder of slices.

    Args:
        volume: The volume.
        path: The file, or for a folder format the folder (new, or empty).
        format: None for a file; ``"dicom"`` for a DICOM series (one int16 CT slice per file, rescaled) or
            ``"tiff"`` for a TIFF stack (one file per slice with ImageJ spacing tags); see :mod:`.slices`.
        compress: Compress the file (formats that can).

    Raises:
        OutputError: Unknown format, a folder that is not empty, or a volume the format cannot hold.
    """
    path = Path(path)
    if format is None:
        _write_file(volume, path, compress)
        return path
    writer = FOLDER_FORMATS.get(format)
    if writer is None:
        raise OutputError(f"Unknown volume format {format!r}; use one of {', '.join(FOLDER_FORMATS)}, or None for a "
                          "file whose suffix gives its format.")
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise OutputError(f"Cannot write {format} slices into {path}: it exists and is not an empty folder. "
                          "Choose a new folder, or remove that one first.")
    with atomic_output(path, folder=True) as tmp:
        writer(_to_slices(volume), tmp)
    return path
