"""Geometry: boxes, exact sub-box matrices, NRRD round trips through SimpleITK, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from CTXAILib import Box, InputError, RegionError, Volume, read_volume, write_volume


def oblique_volume(shape=(6, 7, 8), dtype=np.float32) -> Volume:
    directions = Rotation.from_euler("xyz", [10, -25, 40], degrees=True).as_matrix()
    array = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    return Volume(array, spacing=(0.3, 0.45, 2.0), origin=(-12.5, 33.25, 7.125), directions=directions)


def test_box_basics():
    box = Box((2, 0, 1), (6, 4, 3))
    assert box.size == (4, 4, 2) and box.shape == (2, 4, 4)
    assert box.slices == (slice(1, 3), slice(0, 4), slice(2, 6))
    assert box.grow(1) == Box((1, -1, 0), (7, 5, 4))
    assert box.clip((3, 3, 3)) == Box((2, 0, 1), (3, 3, 3))
    assert box.offset((-2, 0, -1)) == Box((0, 0, 0), (4, 4, 2))
    assert Box.from_corners([1, 2, 3, 4, 5, 6]) == Box((1, 2, 3), (4, 5, 6))
    with pytest.raises(RegionError, match="six integers"):
        Box.from_corners([1, 2, 3])


def test_crop_keeps_matrix_exactly():
    volume = oblique_volume()
    box = Box((2, 3, 1), (7, 6, 5))
    crop = volume.crop(box)
    assert crop.shape == box.shape
    np.testing.assert_array_equal(crop.array, volume.array[box.slices])
    # Same linear part to the bit, origin = the input matrix applied to the box's corner.
    np.testing.assert_array_equal(crop.ijk_to_ras[:3, :3], volume.ijk_to_ras[:3, :3])
    np.testing.assert_array_equal(crop.ijk_to_ras[:3, 3], (volume.ijk_to_ras @ [2, 3, 1, 1])[:3])
    full = volume.embed(crop, box)
    assert full.same_geometry(volume)
    assert full.array[box.slices].sum() == crop.array.sum() and full.array.sum() == crop.array.sum()


def test_ras_to_ijk_inverts_matrix():
    volume = oblique_volume()
    ras = volume.ijk_to_ras @ np.array([3.0, 4.0, 5.0, 1.0])
    np.testing.assert_allclose(volume.ras_to_ijk(ras[:3]), [3, 4, 5], atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_nrrd_round_trip_preserves_geometry(tmp_path, dtype):
    volume = oblique_volume(dtype=dtype)
    path = write_volume(volume, tmp_path / "v.nrrd")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.origin, volume.origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.directions, volume.directions, rtol=0, atol=1e-12)
    # A second round trip is bit-exact: LPS<->RAS is only a sign change.
    again = read_volume(write_volume(back, tmp_path / "w.nrrd"))
    np.testing.assert_array_equal(again.ijk_to_ras, back.ijk_to_ras)


def test_nrrd_header_is_lps(tmp_path):
    """Slicer and ITK files are LPS: RAS origin (10, 20, 30) must be written as (-10, -20, 30)."""
    volume = Volume(np.zeros((2, 2, 2), np.float32), origin=(10.0, 20.0, 30.0))
    path = write_volume(volume, tmp_path / "v.nrrd", compress=False)
    header = path.read_bytes().split(b"\n\n", 1)[0].decode()
    assert "space: left-posterior-superior" in header
    assert "space origin: (-10,-20,30)" in header


def test_vector_volume_round_trip(tmp_path):
    volume = Volume(np.random.default_rng(0).random((3, 4, 5, 6)).astype(np.float32))
    back = read_volume(write_volume(volume, tmp_path / "v.nrrd"))
    assert back.channels == 3
    np.testing.assert_array_equal(back.array, volume.array)


def test_failed_write_leaves_nothing(tmp_path):
    # SimpleITK has no writer for this suffix: it fails after the private temporary file was created.
    with pytest.raises(RuntimeError):
        write_volume(oblique_volume(), tmp_path / "v.unknownformat")
    assert list(tmp_path.iterdir()) == []


def test_bad_volumes_are_refused(tmp_path):
    with pytest.raises(InputError, match="3-D array"):
        Volume(np.zeros((4, 4)))
    with pytest.raises(InputError, match="spacing"):
        Volume(np.zeros((2, 2, 2)), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "missing.nrrd")
    (tmp_path / "junk.nrrd").write_bytes(b"NRRD0004\ntype: float\n")
    with pytest.raises(InputError, match="Could not read"):
        read_volume(tmp_path / "junk.nrrd")
    with pytest.raises(RegionError, match="outside"):
        oblique_volume().crop(Box((50, 50, 50), (60, 60, 60)))
