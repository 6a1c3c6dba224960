"""Volumes stored as 2-D slices: a DICOM (or DICONDE) series read through GDCM, and TIFF stacks read with tifffile.

Everything here works in the frame the files use, LPS (DICOM's patient frame, ITK's and SimpleITK's): the origin
is the position of voxel (0, 0, 0) in mm and ``directions_lps`` holds the unit direction of the i, j and k index
axes as columns. :func:`~CTXAILib.engine.geometry.read_volume` turns a :class:`Slices` into a
:class:`~CTXAILib.engine.geometry.Volume` (RAS) and :func:`~CTXAILib.engine.geometry.write_volume` calls the
writers inside an atomic folder.

DICOM geometry is DICOM's own: origin from the first slice's ImagePositionPatient, i and j directions from
ImageOrientationPatient, in-plane spacing from PixelSpacing, slice spacing from the positions of the first and last
slices; these are decimal strings of at most 16 characters, so a round trip keeps about 15 significant digits.
Grey values have RescaleSlope and RescaleIntercept applied, as float32. A TIFF stack stores only the voxel spacing
(resolution tags with their unit, or ImageJ's ``spacing`` and ``unit``); it is read as Slicer and ITK read TIFF
files: voxel (0, 0, 0) at the origin, the i, j, k axes along L, P and S.
"""

from __future__ import annotations

import io
import locale
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, OutputError

__all__ = ["Slices", "TIFF_SUFFIXES", "check_given_spacing", "image_array", "is_single_dicom_slice", "looks_like_dicom",
           "natural_key", "read_slice_folder", "read_tiff_file", "write_dicom_series", "write_tiff_stack"]

TIFF_SUFFIXES = (".tif", ".tiff")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
_DICOM_MAGIC_OFFSET = 128
# Slices of one series lie on a regular grid; a step this far from the shortest means a lost or foreign slice.
_STEP_TOLERANCE = 0.1
_ORIENTATION_TOLERANCE = 1e-4
# ImageJ's spelling of its calibration units, and the TIFF ResolutionUnit codes (tifffile.RESUNIT), in mm.
_UNIT_MM = {"mm": Fraction(1), "millimeter": Fraction(1), "millimetre": Fraction(1), "cm": Fraction(10),
            "centimeter": Fraction(10), "m": Fraction(1000), "meter": Fraction(1000), "um": Fraction(1, 1000),
            "micron": Fraction(1, 1000), "microns": Fraction(1, 1000), "\u00b5m": Fraction(1, 1000),
            "\\u00b5m": Fraction(1, 1000), "nm": Fraction(1, 10**6), "inch": Fraction(254, 10)}
_RESUNIT_MM = {2: Fraction(254, 10), 3: Fraction(10), 4: Fraction(1), 5: Fraction(1, 1000)}
_IMAGEJ_TYPES = (np.uint8, np.int16, np.uint16, np.float32)


@dataclass
class Slices:
    """A stack of 2-D slices read into one array, with its geometry in LPS.

    Attributes:
        array: Grey values, shape (k, j, i): slice, row, column.
        spacing: Voxel size along i, j, k in mm.
        origin_lps: Position of voxel (0, 0, 0) in mm, LPS.
        directions_lps: 3x3, column n is the unit direction of index axis n (i, j, k) in LPS.
        source: What was read, for the run record: ``reader``, ``path`` and the reader's own details.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    directions_lps: np.ndarray = field(default_factory=lambda: np.eye(3))
    source: dict[str, Any] = field(default_factory=dict)


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: ``slice2`` before ``slice10``.

    >>> sorted(["s10.tif", "s2.tif", "S1.tif"], key=natural_key)
    ['S1.tif', 's2.tif', 's10.tif']
    """
    return [(0, int(part), part) if part.isdigit() else (1, part.lower(), part) for part in re.split(r"(\d+)", name)]


def _numbers(values) -> str:
    return ", ".join(f"{float(v):.6g}" for v in values)


def _listing(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_slice_folder(folder: Path, series: str | None = None, spacing: Sequence[float] | None = None) -> Slices:
    """Read a folder holding one DICOM series, or TIFF slices (one per file, in natural name order).

    Args:
        folder: The folder; hidden files are ignored, and so are files other than TIFF slices beside them (listed
            in ``source``).
        series: SeriesInstanceUID to read when the folder holds several DICOM series.
        spacing: Voxel size (i, j, k) in mm for TIFF slices; it overrides their tags.

    Raises:
        InputError: The folder is empty, holds neither DICOM nor TIFF slices, several series and no choice, slices
            of different sizes, a damaged slice (named), or TIFF slices of unknown spacing and no ``spacing``.
    """
    files = sorted((p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()),
                   key=lambda p: natural_key(p.name))
    if not files:
        inner = sorted((p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir()),
                       key=natural_key)
        if inner:
            raise InputError(f"Volume folder {folder} holds only folders ({_listing(inner)}), no slices. Give the "
                             "folder that holds the DICOM or TIFF slice files themselves.")
        raise InputError(f"Volume folder {folder} is empty. Give a folder holding one DICOM series or a stack of "
                         "TIFF slices, or an image file.")
    tiffs = [p for p in files if p.suffix.lower() in TIFF_SUFFIXES]
    if len(tiffs) < len(files):
        slices = _read_dicom_folder(folder, files, series)
        if slices is not None:
            if spacing is not None:
                check_given_spacing(spacing, slices.spacing, f"DICOM series in {folder}")
            return slices
    if tiffs:
        if series is not None:
            raise InputError(f"--series {series} was given, but {folder} holds TIFF slices, not DICOM. Leave "
                             "--series out.")
        # Scanners leave logs and previews beside the slices; the record lists what was left out.
        return _read_tiff_slices(folder, tiffs, spacing, [p.name for p in files if p not in tiffs])
    raise InputError(f"Volume folder {folder} holds neither a DICOM series nor TIFF slices (found "
                     f"{_listing([p.name for p in files])}). Give a folder of DICOM slices or of .tif/.tiff slices, "
                     "or an image file (NRRD, NIfTI, MHA, multi-page TIFF).")


def check_given_spacing(given: Sequence[float], stored: Sequence[float], what: str) -> None:
    if not np.allclose(given, stored, rtol=1e-6, atol=0):
        raise InputError(f"--spacing {','.join(f'{v:g}' for v in given)} mm disagrees with the spacing the "
                         f"{what} stores ({_numbers(stored)} mm). Leave --spacing out: it is "
                         "for TIFF stacks, whose spacing may be missing or wrong.")


# --- DICOM -------------------------------------------------------------------------------------------------------

def looks_like_dicom(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return False
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_single_dicom_slice(path: Path) -> bool:
    """True for a DICOM file holding one 2-D image (a multi-frame file holds a whole volume)."""
    try:
        size = _header(path).GetSize()
    except RuntimeError:
        return False  # SimpleITK's reader will say what is wrong with it
    return len(size) < 3 or size[2] <= 1


def _tag(reader, key: str) -> str | None:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else None


def _header(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


@contextmanager
def _quiet_itk():
    """ITK's warnings on stderr ("No Series were found", "Non uniform sampling"), off: the checks here say it."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


@contextmanager
def _kept_locale():
    """GDCM's writer switches the whole process to the C locale and leaves it so; then Python's default text
    encoding becomes ASCII for every later open() in the process (in Slicer too). Put the caller's locale back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _itk_reason(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return next((line.split("): ", 1)[-1] for line in lines if "ITK ERROR" in line), lines[-1]).rstrip(".")


def _read_dicom_folder(folder: Path, files: list[Path], series: str | None) -> Slices | None:
    """The chosen series of ``folder``, or None when it holds no DICOM image at all."""
    import SimpleITK as sitk

    with _quiet_itk():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        members = {uid: [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]
                   for uid in uids}
    taken = {p.name for paths in members.values() for p in paths}
    # GDCM leaves out, without a word, a slice it cannot parse: a damaged slice would become a hole in the volume.
    damaged = [p.name for p in files if p.name not in taken and looks_like_dicom(p)]
    if damaged:
        raise InputError(f"Slice {damaged[0]} in {folder} is not a readable DICOM image (damaged, truncated or not "
                         f"an image)" + (f", nor are {_listing(damaged[1:])}" if len(damaged) > 1 else "") +
                         ". Replace it with an intact copy, or remove it from the folder.")
    if not uids:
        return None
    if series is None and len(uids) > 1:
        raise InputError(f"Volume folder {folder} holds {len(uids)} DICOM series: {_series_list(members)}. Pick one "
                         "with --series UID (series=UID in read_volume).")
    if series is not None and series not in members:
        raise InputError(f"Volume folder {folder} holds no DICOM series {series}; it holds {_series_list(members)}. "
                         "Pick one of these with --series UID.")
    uid = series if series is not None else uids[0]
    return _read_series(folder, uid, members[uid])


def _series_list(members: dict[str, list[Path]]) -> str:
    entries = []
    for uid, paths in members.items():
        description = _tag(_header(paths[0]), "0008|103e")
        entries.append(f"{uid} ({len(paths)} slices" + (f', "{description}")' if description else ")"))
    return "; ".join(entries)


def _read_series(folder: Path, uid: str, paths: list[Path]) -> Slices:
    import SimpleITK as sitk

    headers = []
    for path in paths:
        try:
            headers.append(_header(path))
        except RuntimeError as exc:
            raise InputError(f"Slice {path.name} of DICOM series {uid} in {folder} cannot be read: "
                             f"{_itk_reason(exc)}. Replace it with an intact copy, or remove it.") from None
    sizes = [tuple(h.GetSize()[:2]) for h in headers]
    for path, size in zip(paths, sizes):
        if size != sizes[0]:
            raise InputError(f"Slices of DICOM series {uid} in {folder} differ in size: {paths[0].name} is "
                             f"{sizes[0][0]}x{sizes[0][1]} pixels, {path.name} is {size[0]}x{size[1]}. A volume "
                             "needs slices of one size: remove the foreign slices.")
    _check_slice_positions(folder, uid, paths, headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    # Rescaled slices would come as float64 (twice the volume); float32 keeps a grey value to 6e-8 of itself.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"DICOM series {uid} in {folder} cannot be read: {_itk_reason(exc)}"
                         f"{_damaged_slice(paths)}. Replace the damaged slice with an intact copy.") from None
    source = {"reader": "dicom", "path": str(folder), "series_uid": uid, "slices": len(paths)}
    description = _tag(headers[0], "0008|103e")
    if description:
        source["description"] = description
    rescale = {(_tag(h, "0028|1053") or "1", _tag(h, "0028|1052") or "0") for h in headers}
    source["rescale_slope_intercept"] = ([float(v) for v in rescale.pop()] if len(rescale) == 1 else "per slice")
    return Slices(image_array(image), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                  np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3), source)


class _ImageBuffer:
    """Exposes a SimpleITK image's voxel buffer to numpy and keeps the image alive as the array's base."""

    def __init__(self, image, interface: dict):
        self.image = image
        # Writable: the image was read for this array alone, nothing else sees its buffer.
        self.__array_interface__ = dict(interface, data=(interface["data"][0], False))


def image_array(image) -> np.ndarray:
    """The image's voxels (k, j, i[, c]) without a copy: a copy of a whole part would double the memory a read
    takes at its peak. (``GetArrayViewFromImage`` alone does not keep the image, hence the buffer holder.)"""
    import SimpleITK as sitk

    view = sitk.GetArrayViewFromImage(image)
    return np.asarray(_ImageBuffer(image, view.__array_interface__))


def _damaged_slice(paths: list[Path]) -> str:
    import SimpleITK as sitk

    for path in paths:
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            return f" (slice {path.name} is damaged)"
    return ""


def _check_slice_positions(folder: Path, uid: str, paths: list[Path], headers: list) -> None:
    """Refuse slices that do not lie on one regular grid: a lost slice, two stacks in one series, a tilted stack."""
    directions = [np.array(h.GetDirection(), dtype=np.float64).reshape(3, 3) for h in headers]
    for path, direction in zip(paths, directions):
        if not np.allclose(direction[:, :2], directions[0][:, :2], atol=_ORIENTATION_TOLERANCE):
            raise InputError(f"Slices of DICOM series {uid} in {folder} differ in orientation ({paths[0].name} and "
                             f"{path.name}): the series mixes several stacks. Export the stack you need on its own.")
    if len(paths) < 2:
        return
    normal = directions[0][:, 2]
    positions = np.array([h.GetOrigin() for h in headers], dtype=np.float64)
    along = (positions - positions[0]) @ normal
    steps = np.diff(along)
    shortest = int(np.argmin(steps))
    step = float(steps[shortest])  # a lost slice makes one step twice as long; the shortest one is the grid's
    if step <= 0:
        raise InputError(f"Slices of DICOM series {uid} in {folder} share one position ({paths[shortest].name} and "
                         f"{paths[shortest + 1].name}): the series mixes two acquisitions. Export each one on its "
                         "own.")
    odd = np.flatnonzero(np.abs(steps - step) > _STEP_TOLERANCE * step)
    if odd.size:
        n = int(odd[0])
        raise InputError(f"Slices of DICOM series {uid} in {folder} are not evenly spaced: {paths[n].name} to "
                         f"{paths[n + 1].name} is {steps[n]:.4g} mm, the shortest step {step:.4g} mm. A slice is "
                         "missing or foreign: export the series again, complete.")
    drift = float(np.linalg.norm(positions - positions[0] - np.outer(along, normal), axis=1).max())
    if drift > _STEP_TOLERANCE * step:
        raise InputError(f"Slices of DICOM series {uid} in {folder} are stacked obliquely to their planes (gantry "
                         f"tilt or shear: {drift:.3g} mm off the slice normal); CTXAI explains volumes on a "
                         "rectilinear grid. Resample the series onto one (for example in Slicer) and save it as "
                         "NRRD.")


def _decimal_string(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) as close to ``value`` as that length allows."""
    value = float(value) + 0.0  # no "-0"
    for digits in range(17, 0, -1):
        text = f"{value:.{digits}g}".replace("e+", "e")
        text = re.sub(r"^(-?)0\.", r"\1.", text)
        if len(text) <= 16:
            return text
    raise OutputError(f"{value!r} does not fit a DICOM decimal string.")


def _new_uid() -> str:
    # A UUID-derived UID (DICOM PS3.5 B.2) needs no registered organisation root.
    return f"2.25.{uuid.uuid4().int}"


def _int16_rescale(array: np.ndarray) -> tuple[float, float]:
    """Slope and intercept that map int16 stored values onto ``array``; exact for integers spanning < 65536."""
    lo, hi = float(array.min()), float(array.max())
    integral = np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array))
    if integral and hi - lo <= 65535:
        intercept = 0.0 if lo >= -32768 and hi <= 32767 else lo + 32768
        return 1.0, intercept
    slope = float(_decimal_string((hi - lo) / 65535 if hi > lo else 1.0))
    return slope, float(_decimal_string(lo + 32768 * slope))


def write_dicom_series(slices: Slices, folder: Path, description: str = "CTXAI volume") -> None:
    """Write one CT-image DICOM file per slice into ``folder`` (which must exist and be empty).

    Stored values are int16 with RescaleSlope/RescaleIntercept: exact for integer grey values spanning less than
    65536, otherwise quantised to 65536 levels over the array's range. Every slice carries its
    ImagePositionPatient, ImageOrientationPatient, PixelSpacing and SliceThickness, one Study, Series and Frame of
    Reference UID; the geometry keeps what 16-character decimal strings keep (about 15 significant digits).
    """
    import SimpleITK as sitk

    array = np.asarray(slices.array)
    if array.ndim != 3:
        raise OutputError(f"A DICOM series holds one grey value per voxel; this volume has shape {array.shape}. "
                          "Write a multi-channel volume as NRRD.")
    if not np.isfinite(array).all():
        raise OutputError("The volume holds NaN or infinite values, which DICOM's int16 cannot store. Write it as "
                          "NRRD.")
    slope, intercept = _int16_rescale(array)
    spacing = np.asarray(slices.spacing, dtype=np.float64)
    directions = np.asarray(slices.directions_lps, dtype=np.float64)
    origin = np.asarray(slices.origin_lps, dtype=np.float64)
    study, series, frame = _new_uid(), _new_uid(), _new_uid()
    orientation = "\\".join(_decimal_string(v) for v in (*directions[:, 0], *directions[:, 1]))
    common = {"0008|0060": "CT", "0008|0008": "DERIVED\\SECONDARY", "0008|103e": description[:64],
              "0020|000d": study, "0020|000e": series, "0020|0052": frame, "0020|0011": "1", "0020|0037": orientation,
              "0018|0050": _decimal_string(spacing[2]), "0018|0088": _decimal_string(spacing[2]),
              "0028|1052": _decimal_string(intercept), "0028|1053": _decimal_string(slope),
              # A float buffer needs its stored type: signed 16-bit; GDCM applies the inverse rescale.
              "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    width = max(4, len(str(array.shape[0])))
    with _kept_locale():
        for k in range(array.shape[0]):
            _write_dicom_slice(writer, array[k], k, spacing, origin, directions, common,
                               folder / f"slice{k + 1:0{width}d}.dcm")


def _write_dicom_slice(writer, plane: np.ndarray, k: int, spacing: np.ndarray, origin: np.ndarray,
                       directions: np.ndarray, common: dict[str, str], path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(plane.astype(np.float64))
    image.SetSpacing(tuple(spacing[:2]))
    position = origin + k * spacing[2] * directions[:, 2]
    tags = dict(common)
    tags.update({"0020|0013": str(k + 1), "0008|0018": _new_uid(),
                 "0020|0032": "\\".join(_decimal_string(v) for v in position),
                 "0020|1041": _decimal_string(float(position @ np.cross(directions[:, 0], directions[:, 1])))})
    for key, value in tags.items():
        image.SetMetaData(key, value)
    writer.SetFileName(str(path))
    writer.Execute(image)


# --- TIFF --------------------------------------------------------------------------------------------------------

def _tiff_spacing(tif, page) -> tuple[list[float | None], str]:
    """Spacing (i, j, k) in mm from a TIFF's tags (None where unknown) and where it came from."""
    imagej = tif.imagej_metadata or {}
    unit = _UNIT_MM.get(str(imagej.get("unit", "")).strip().lower())
    tag_unit = page.tags.get("ResolutionUnit")
    code = int(tag_unit.value) if tag_unit is not None else 2  # TIFF's default unit is the inch
    in_plane_unit = _RESUNIT_MM.get(code, unit if code == 1 else None)
    spacing: list[float | None] = [None, None, None]
    for axis, name in enumerate(("XResolution", "YResolution")):
        tag = page.tags.get(name)
        if tag is None or in_plane_unit is None:
            continue
        numerator, denominator = tag.value
        if numerator > 0 and denominator > 0:
            spacing[axis] = float(Fraction(denominator, numerator) * in_plane_unit)
    if unit is not None and "spacing" in imagej:
        try:
            spacing[2] = float(Fraction(str(imagej["spacing"])) * unit)
        except (ValueError, ZeroDivisionError):
            pass  # not a number: the spacing stays unknown and the caller asks for --spacing
    return spacing, ("ImageJ tags" if imagej else "TIFF resolution tags")


def _resolve_spacing(found: list[float | None], found_in: str, given: Sequence[float] | None,
                     what: str) -> tuple[tuple[float, float, float], str]:
    if given is not None:
        return tuple(float(v) for v in given), "given (--spacing)"
    if any(v is None or not v > 0 for v in found):
        known = ", ".join(f"{axis} {v:g} mm" for axis, v in zip("ijk", found) if v)
        raise InputError(f"The voxel spacing of {what} is unknown" + (f" (its tags give only {known})" if known
                                                                      else " (its tags give none)") +
                         ". Pass it in mm as --spacing sx,sy,sz (spacing=(sx, sy, sz) in read_volume).")
    return tuple(found), found_in


def _open_tiff(path: Path, slice_of: Path | None = None):
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
        if not tif.pages:
            raise ValueError("it holds no image")
        return tif
    except Exception as exc:  # tifffile and its codecs raise many kinds on a damaged file; all mean the same here
        what = f"Slice {path.name} in {slice_of}" if slice_of else f"Volume file {path}"
        raise InputError(f"{what} is not a readable TIFF file ({exc}). Replace it with an intact copy"
                         + (", or remove it." if slice_of else ".")) from None


def _read_tiff_slices(folder: Path, paths: list[Path], spacing: Sequence[float] | None,
                      ignored: list[str]) -> Slices:
    first = None
    array = None
    for index, path in enumerate(paths):
        with _open_tiff(path, folder) as tif:
            page = tif.pages[0]
            if len(tif.pages) > 1:
                raise InputError(f"TIFF slice {path.name} in {folder} holds {len(tif.pages)} images; a folder of "
                                 "slices needs one image per file. Give a multi-page TIFF as the file itself.")
            if page.samplesperpixel > 1 or len(page.shape) != 2:
                raise InputError(f"TIFF slice {path.name} in {folder} is a colour or multi-channel image (shape "
                                 f"{page.shape}); CT slices hold one grey value per pixel. Export grey slices.")
            if first is None:
                first = (path.name, page.shape, page.dtype)
                found, found_in = _tiff_spacing(tif, page)
                array = np.empty((len(paths), *page.shape), dtype=page.dtype)
            elif page.shape != first[1] or page.dtype != first[2]:
                raise InputError(f"TIFF slices in {folder} differ: {first[0]} is {first[1][1]}x{first[1][0]} "
                                 f"pixels of {first[2]}, {path.name} is {page.shape[1]}x{page.shape[0]} of "
                                 f"{page.dtype}. A volume needs slices of one size and type: remove the foreign "
                                 "ones.")
            try:
                array[index] = page.asarray()
            except Exception as exc:  # as in _open_tiff: a damaged strip fails with the codec's own error
                raise InputError(f"Slice {path.name} in {folder} is not a readable TIFF file ({exc}). Replace it "
                                 "with an intact copy, or remove it.") from None
    resolved, found_in = _resolve_spacing(found, found_in, spacing, f"the TIFF slices in {folder}")
    source = {"reader": "tiff", "path": str(folder), "files": len(paths), "first": paths[0].name,
              "last": paths[-1].name, "spacing_from": found_in}
    if ignored:
        source["other_files_ignored"] = ignored
    return Slices(array, resolved, source=source)


def read_tiff_file(path: Path, spacing: Sequence[float] | None = None) -> Slices:
    """Read a multi-page TIFF (one page per slice, or an ImageJ z-stack) as a volume.

    Raises:
        InputError: The file is damaged, holds one 2-D image, colour or several channels or time points, or its
            spacing is unknown and ``spacing`` is not given.
    """
    with _open_tiff(path) as tif:
        series = tif.series[0]
        axes = series.axes
        shape = series.shape
        if "S" in axes and shape[axes.index("S")] > 1 or "C" in axes and shape[axes.index("C")] > 1:
            raise InputError(f"TIFF {path} holds a colour or multi-channel image (axes {axes}, shape {shape}); CT "
                             "slices hold one grey value per pixel. Export grey slices.")
        spatial = [n for n, axis in zip(shape, axes) if n > 1 or axis in "YX"]
        if len(spatial) < 3:
            raise InputError(f"TIFF {path} holds a single 2-D image (shape {tuple(shape)}); CTXAI explains 3-D "
                             "volumes. Give the folder of slices, or a multi-page TIFF.")
        if len(spatial) > 3:
            raise InputError(f"TIFF {path} holds several stacks (axes {axes}, shape {tuple(shape)}: channels or "
                             "time points); CTXAI explains one 3-D volume. Export one stack of grey slices.")
        try:
            array = series.asarray().reshape(spatial)
        except Exception as exc:  # as in _open_tiff
            raise InputError(f"Volume file {path} is not a readable TIFF file ({exc}). Replace it with an intact "
                             "copy.") from None
        found, found_in = _tiff_spacing(tif, tif.pages[0])
    resolved, found_in = _resolve_spacing(found, found_in, spacing, f"TIFF {path}")
    source = {"reader": "tiff", "path": str(path), "files": 1, "pages": int(array.shape[0]),
              "spacing_from": found_in}
    return Slices(array, resolved, source=source)


def _tiff_resolution(spacing_mm: float) -> tuple[int, int]:
    """Pixels per mm as a TIFF rational whose inverse is ``spacing_mm`` (exact for up to 9 decimal digits)."""
    exact = Fraction(repr(float(spacing_mm)))
    fraction = exact if max(exact.numerator, exact.denominator) < 2**32 else exact.limit_denominator(2**31)
    return fraction.denominator, fraction.numerator


def write_tiff_stack(slices: Slices, folder: Path) -> None:
    """Write one TIFF file per slice into ``folder`` (which must exist and be empty), with ImageJ spacing tags.

    A TIFF stack stores no origin and no orientation, so only volumes at origin 0 with axes along L, P, S (how
    readers place TIFF stacks) can be written without losing their geometry; others are refused. uint8, int16,
    uint16 and float32 are written as they are, other types as float32 when that is exact.
    """
    import tifffile

    array = np.asarray(slices.array)
    if array.ndim != 3:
        raise OutputError(f"A TIFF stack holds one grey value per voxel; this volume has shape {array.shape}. "
                          "Write a multi-channel volume as NRRD.")
    if np.any(np.asarray(slices.origin_lps) != 0) or not np.array_equal(slices.directions_lps, np.eye(3)):
        raise OutputError("A TIFF stack stores the voxel spacing only: readers put voxel (0,0,0) at the origin and "
                          f"the i, j, k axes along L, P, S, but this volume has origin ({_numbers(slices.origin_lps)}) "
                          f"and directions ({_numbers(np.ravel(slices.directions_lps))}) (LPS). Write it as NRRD "
                          "or DICOM, or give it origin (0, 0, 0) and directions numpy.diag([-1, -1, 1]) (RAS).")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype not in _IMAGEJ_TYPES:
        converted = array.astype(np.float32)
        if not np.array_equal(converted, array):
            raise OutputError(f"{array.dtype} grey values do not all fit float32, the widest type TIFF stacks are "
                              "read with (ImageJ). Write the volume as NRRD, or cast it to float32 first.")
        array = converted
    resolution = (_tiff_resolution(slices.spacing[0]), _tiff_resolution(slices.spacing[1]))
    metadata = {"spacing": float(slices.spacing[2]), "unit": "mm", "axes": "YX"}
    width = max(4, len(str(array.shape[0])))
    for k in range(array.shape[0]):
        # Through memory: tifffile does not check short writes, so a full disk would leave truncated slices.
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, array[k], imagej=True, resolution=resolution, metadata=metadata)
        (folder / f"slice{k + 1:0{width}d}.tif").write_bytes(buffer.getvalue())

