"""Volumes as slices: DICOM series and TIFF stacks read and written with their geometry, the same attribution as
from NRRD through `ctxai explain`, and one clear line for each way a folder of slices goes wrong."""

from __future__ import annotations

import json
import locale
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from scipy.spatial.transform import Rotation

from CTXAILib import Explainer, InputError, Target, Volume, read_volume, write_volume
from CTXAILib.engine.geometry import Box
from CTXAILib.engine.targets import BoxRegion
from CTXAILib.errors import OutputError

CTXAI = shutil.which("ctxai") or str(Path(sys.executable).with_name("ctxai"))
LPS_AXES = np.diag([-1.0, -1.0, 1.0])  # RAS directions of a volume whose axes run along L, P, S
ROI = (6, 8, 10, 22, 24, 26)


def small(shape=(4, 5, 6), spacing=(0.3, 0.45, 2.0), dtype=np.int16) -> Volume:
    array = (np.arange(np.prod(shape)).reshape(shape) * 7 - 500).astype(dtype)
    return Volume(array, spacing=spacing, directions=LPS_AXES)


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory):
    """A phantom with integer grey values (so DICOM's int16 holds it exactly), written three ways, plus a second
    DICOM series in the same folder so that the series must be picked."""
    from CTXAILib.synthetic.phantom import generate_phantom

    phantom = generate_phantom(11, (32, 32, 32))
    # Origin 0 and axes along L, P, S: the geometry a TIFF stack can hold (it stores the spacing only).
    volume = Volume(np.round(phantom.ct.array).astype(np.int16), phantom.ct.spacing, directions=LPS_AXES)
    folder = tmp_path_factory.mktemp("phantom")
    files = {"nrrd": write_volume(volume, folder / "ct.nrrd"),
             "dicom": write_volume(volume, folder / "dicom", format="dicom"),
             "tiff": write_volume(volume, folder / "tiff", format="tiff")}
    other = write_volume(volume.with_array(phantom.labels.array.astype(np.int16)), folder / "labels",
                         format="dicom")
    for path in other.iterdir():
        path.rename(files["dicom"] / f"labels_{path.name}")
    other.rmdir()
    return volume, files


def test_dicom_and_tiff_give_the_nrrd_attribution_through_the_cli(tmp_path, phantom_files, unet_card):
    volume, files = phantom_files
    series = {uid: len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(files["dicom"]), uid))
              for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(files["dicom"]))}
    assert sorted(series.values()) == [32, 32]
    ct_uid = next(uid for uid in series if read_volume(files["dicom"], series=uid).array.min() < 0)
    out = subprocess.run([CTXAI, "explain", "--volume", str(files["dicom"]), "--series", ct_uid, "--model",
                          str(unet_card), "--method", "saliency", "--roi",
                          ",".join(map(str, ROI)), "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["input"]["source"] == {"reader": "dicom", "path": str(files["dicom"]), "series_uid": ct_uid,
                                         "slices": 32, "description": "CTXAI volume",
                                         "rescale_slope_intercept": [1.0, 0.0]}
    from_cli = read_volume(tmp_path / "run" / "attribution.nrrd")

    explainer = Explainer(unet_card, device="cpu")
    target = Target("defect", region=BoxRegion(Box.from_corners(ROI)))
    maps = {}
    for name in ("nrrd", "tiff"):
        read = read_volume(files[name])
        assert read.same_geometry(volume), name  # NRRD and the TIFF tags hold these values exactly
        maps[name] = explainer.explain(read, "saliency", target).attribution
    assert np.abs(maps["nrrd"].array).sum() > 0
    np.testing.assert_array_equal(from_cli.array, maps["nrrd"].array)  # bit-identical
    np.testing.assert_array_equal(maps["tiff"].array, maps["nrrd"].array)
    # DICOM stores positions and orientations as decimal strings of at most 16 characters: its geometry is
    # only as exact as ~15 significant digits (these values happen to be exact; the oblique test shows the rest).
    np.testing.assert_allclose(from_cli.ijk_to_ras, volume.ijk_to_ras, rtol=0, atol=1e-12)
    assert maps["nrrd"].same_geometry(volume) and maps["tiff"].same_geometry(volume)
    # Control: the comparison can fail. The same volume with its slices in the wrong order explains differently.
    flipped = explainer.explain(volume.with_array(volume.array[::-1].copy()), "saliency", target).attribution
    assert not np.array_equal(flipped.array, maps["nrrd"].array)


def test_writing_dicom_keeps_the_process_locale(tmp_path):
    before = locale.setlocale(locale.LC_ALL)
    write_volume(small(), tmp_path / "series", format="dicom")
    assert locale.setlocale(locale.LC_ALL) == before and locale.getpreferredencoding(False) == "UTF-8"
    # Control: GDCM's own writer, given a position, leaves the process in the C locale (ASCII text by default).
    image = sitk.GetImageFromArray(np.zeros((4, 5), np.int16))
    image.SetMetaData("0020|0032", "1\\2\\3")
    try:
        sitk.WriteImage(image, str(tmp_path / "raw.dcm"))
        assert locale.setlocale(locale.LC_ALL) != before
    finally:
        locale.setlocale(locale.LC_ALL, before)


def test_dicom_geometry_and_rescale_round_trip(tmp_path):
    directions = Rotation.from_euler("xyz", [10, -25, 40], degrees=True).as_matrix()
    shape = (5, 6, 7)
    wide = np.arange(np.prod(shape)).reshape(shape) * 300 - 1000  # -1000..61700: int16 needs an intercept
    volume = Volume(wide.astype(np.int32), spacing=(0.3, 0.45, 2.0), origin=(-12.5, 33.25, 7.125),
                    directions=directions)
    back = read_volume(write_volume(volume, tmp_path / "wide", format="dicom"))
    intercept = back.source["rescale_slope_intercept"][1]
    assert intercept != 0 and np.array_equal(back.array, wide)  # RescaleIntercept applied on reading
    # LPS position and orientation -> IJK-to-RAS, to the ~15 digits a DICOM decimal string holds.
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, rtol=0, atol=1e-12)
    first = sitk.ImageFileReader()
    first.SetFileName(str(tmp_path / "wide" / "slice0001.dcm"))
    first.ReadImageInformation()
    assert first.GetMetaData("0028|0100").strip() == "16" and first.GetMetaData("0028|0103").strip() == "1"
    assert len(first.GetMetaData("0020|0037").split("\\")) == 6
    assert all(len(v) <= 16 for v in first.GetMetaData("0020|0037").strip().split("\\"))

    noisy = Volume(np.random.default_rng(0).normal(0.0, 100.0, shape), spacing=(0.3, 0.45, 2.0))
    back = read_volume(write_volume(noisy, tmp_path / "noisy", format="dicom"))
    slope = back.source["rescale_slope_intercept"][0]
    assert 0 < slope < 0.01  # 65536 levels over the range: quantised to half a step at most
    assert np.abs(back.array - noisy.array).max() <= slope / 2 * 1.001
    # Read as float32, not ITK's float64 for rescaled slices (twice the volume, and a copy of that): the same grey
    # values as a float64 read to float32's precision.
    assert back.array.dtype == np.float32 and back.array.flags.writeable
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sorted(str(p) for p in (tmp_path / "noisy").iterdir()))
    wide64 = sitk.GetArrayFromImage(reader.Execute())
    assert wide64.dtype == np.float64
    np.testing.assert_allclose(back.array, wide64, rtol=1e-6, atol=1e-4)


def test_tiff_spacing_from_tags_natural_order_and_multipage(tmp_path):
    volume = small(shape=(12, 3, 4))
    written = write_volume(volume, tmp_path / "stack", format="tiff")
    assert read_volume(written).same_geometry(volume)
    # Unpadded names: slice2 comes before slice10 (a plain sort would put 10, 11, 12 after 1).
    loose = tmp_path / "loose"
    loose.mkdir()
    for k in range(12):
        tifffile.imwrite(loose / f"slice{k + 1}.tif", volume.array[k], resolution=(100 / 3, 100 / 4.5),
                         resolutionunit="CENTIMETER")
    with pytest.raises(InputError, match=r"tags give only i 0\.3 mm, j 0\.45 mm\). Pass it in mm as --spacing"):
        read_volume(loose)
    (loose / "scan.log").write_text("Pixel Size (um)=300")  # what scanners leave beside the slices
    read = read_volume(loose, spacing=(0.3, 0.45, 2.0))
    np.testing.assert_array_equal(read.array, volume.array)
    assert read.source["files"] == 12 and read.source["last"] == "slice12.tif"
    assert read.source["other_files_ignored"] == ["scan.log"]
    # One multi-page ImageJ file, in micrometres.
    tifffile.imwrite(tmp_path / "stack.tif", volume.array, imagej=True, resolution=(1 / 300, 1 / 450),
                     metadata={"spacing": 2000.0, "unit": "micron", "axes": "ZYX"})
    single = read_volume(tmp_path / "stack.tif")
    np.testing.assert_array_equal(single.array, volume.array)
    np.testing.assert_allclose(single.spacing, (0.3, 0.45, 2.0), rtol=1e-12)
    assert single.source["pages"] == 12


def _series_folder(tmp_path: Path, name: str = "series", shape=(4, 5, 6)) -> Path:
    return write_volume(small(shape), tmp_path / name, format="dicom")


def test_folder_errors_empty_and_neither(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty. Give a folder holding one DICOM series or a stack of TIFF"):
        read_volume(tmp_path / "empty")
    (tmp_path / "empty" / "SE0001").mkdir()
    with pytest.raises(InputError, match=r"holds only folders \(SE0001\), no slices. Give the folder that holds"):
        read_volume(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("scan log")
    (other / "preview.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match=r"holds neither a DICOM series nor TIFF slices \(found notes.txt, "
                                         r"preview.png\)"):
        read_volume(other)


def test_several_series_are_listed_and_one_is_picked(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    uids = []
    for index, shape in enumerate([(4, 5, 6), (3, 5, 6)]):
        folder = _series_folder(tmp_path, f"s{index}", shape)
        uids.append(read_volume(folder).source["series_uid"])
        for path in folder.iterdir():
            path.rename(both / f"{index}_{path.name}")
    with pytest.raises(InputError) as error:
        read_volume(both)
    message = str(error.value)
    assert "holds 2 DICOM series" in message and "Pick one with --series UID" in message
    assert f'{uids[0]} (4 slices, "CTXAI volume")' in message and f"{uids[1]} (3 slices" in message
    assert read_volume(both, series=uids[1]).shape == (3, 5, 6)
    with pytest.raises(InputError, match="holds no DICOM series 1.2.3; it holds"):
        read_volume(both, series="1.2.3")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_dicom_slice_is_named(tmp_path, damage):
    folder = _series_folder(tmp_path)
    victim = folder / "slice0003.dcm"
    data = victim.read_bytes()
    victim.write_bytes({"garbage": os.urandom(len(data)), "truncated": data[: len(data) - 40], "empty": b""}[damage])
    # GDCM alone would drop the slice and read a volume with a hole in it.
    with pytest.raises(InputError, match=r"Slice slice0003.dcm in .* is not a readable DICOM image"):
        read_volume(folder)


def test_a_missing_dicom_slice_and_mixed_sizes(tmp_path):
    folder = _series_folder(tmp_path)
    (folder / "slice0002.dcm").unlink()
    with pytest.raises(InputError, match=r"not evenly spaced: slice0001.dcm to slice0003.dcm is 4 mm, the "
                                         r"shortest step 2 mm"):
        read_volume(folder)
    mixed = _series_folder(tmp_path, "mixed")
    header = sitk.ReadImage(str(mixed / "slice0002.dcm"))
    wider = sitk.GetImageFromArray(np.zeros((1, 5, 9), np.int16))
    for key in header.GetMetaDataKeys():
        if key not in ("0028|0010", "0028|0011"):
            wider.SetMetaData(key, header.GetMetaData(key))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(mixed / "slice0002.dcm"))
    before = locale.setlocale(locale.LC_ALL)
    try:
        writer.Execute(wider)
    finally:
        locale.setlocale(locale.LC_ALL, before)  # GDCM's writer leaves the C locale (see the locale test)
    with pytest.raises(InputError, match=r"differ in size: slice0001.dcm is 6x5 pixels, slice0002.dcm is 9x5"):
        read_volume(mixed)


def test_tiff_slice_errors(tmp_path):
    stack = write_volume(small(), tmp_path / "stack", format="tiff")
    victim = stack / "slice0002.tif"
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(InputError, match=r"Slice slice0002.tif in .* is not a readable TIFF file"):
        read_volume(stack)
    mixed = write_volume(small(), tmp_path / "mixed", format="tiff")
    tifffile.imwrite(mixed / "slice0003.tif", np.zeros((5, 7), np.int16))
    with pytest.raises(InputError, match=r"TIFF slices in .* differ: slice0001.tif is 6x5 pixels of int16, "
                                         r"slice0003.tif is 7x5"):
        read_volume(mixed)


def test_spacing_and_series_arguments_are_checked(tmp_path):
    series = _series_folder(tmp_path)
    assert read_volume(series, spacing=(0.3, 0.45, 2.0)).spacing == (0.3, 0.45, 2.0)
    with pytest.raises(InputError, match=r"--spacing 1,1,1 mm disagrees with the spacing the DICOM series"):
        read_volume(series, spacing=(1, 1, 1))
    with pytest.raises(InputError, match="three positive sizes in mm"):
        read_volume(series, spacing=(1, 0))
    with pytest.raises(InputError, match="is one DICOM slice. Give the folder holding its series"):
        read_volume(series / "slice0001.dcm")
    nrrd = write_volume(small(), tmp_path / "v.nrrd")
    with pytest.raises(InputError, match="picks a series from a DICOM folder, but .* is a file"):
        read_volume(nrrd, series="1.2.3")


def test_writers_are_atomic(tmp_path):
    oblique = Volume(small().array, spacing=(0.3, 0.45, 2.0), origin=(1.0, 2.0, 3.0))
    with pytest.raises(OutputError, match="A TIFF stack stores the voxel spacing only"):
        write_volume(oblique, tmp_path / "tiff", format="tiff")
    keep = tmp_path / "kept"
    keep.mkdir()
    (keep / "previous.txt").write_text("earlier output")
    with pytest.raises(OutputError, match="exists and is not an empty folder"):
        write_volume(small(), keep, format="dicom")
    assert [p.name for p in keep.iterdir()] == ["previous.txt"]
    # A real write failure half-way through the first slice (the file-size limit), in a child process.
    script = textwrap.dedent(f"""
        import resource, signal, numpy as np
        from CTXAILib import Volume, write_volume
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        volume = Volume(np.zeros((3, 40, 40), np.int16), directions=np.diag([-1.0, -1.0, 1.0]))
        for format in ("tiff", "dicom"):
            try:
                write_volume(volume, {str(tmp_path)!r} + "/" + format, format=format)
            except (OSError, RuntimeError) as exc:
                print(format, "failed", type(exc).__name__)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.split() == ["tiff", "failed", "OSError", "dicom", "failed", "RuntimeError"], out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no partial folder, no temporary
