"""The streaming NRRD writer: what SimpleITK reads back from it equals what it reads back from its own NRRD writer
(voxels, dtype, geometry), for every volume kind a run writes; a zero-padded map is written without its untouched
pages becoming resident; a read shares SimpleITK's buffer instead of copying it."""

import gc

import numpy as np
import pytest
import SimpleITK as sitk

from CTXAILib.engine.geometry import Box, PlacedVolume, Volume, _LPS_TO_RAS, read_volume, write_volume

RNG = np.random.default_rng(7)
TILTED = np.linalg.qr(RNG.normal(size=(3, 3)))[0]
ARRAYS = {
    "float32": RNG.normal(size=(5, 6, 7)).astype(np.float32),
    "float64": RNG.normal(size=(5, 6, 7)),
    "int16": RNG.integers(-900, 900, (5, 6, 7)).astype(np.int16),
    "uint16": RNG.integers(0, 60000, (5, 6, 7)).astype(np.uint16),
    "bool": RNG.integers(0, 2, (5, 6, 7)).astype(bool),
    "vector-float32": RNG.normal(size=(3, 5, 6, 7)).astype(np.float32),
    "vector-uint8": RNG.integers(0, 255, (2, 5, 6, 7)).astype(np.uint8),
}


def _sitk_nrrd(volume: Volume, path, compress: bool) -> None:
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    vector = array.ndim == 4
    image = sitk.GetImageFromArray(np.moveaxis(array, 0, -1) if vector else array, isVector=vector)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(tuple(np.asarray(volume.origin) * _LPS_TO_RAS))
    image.SetDirection(tuple((volume.directions * _LPS_TO_RAS[:, None]).ravel()))
    sitk.WriteImage(image, str(path), useCompression=compress)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("kind", list(ARRAYS))
def test_streamed_nrrd_reads_back_as_simpleitks_own(tmp_path, kind, compress):
    volume = Volume(ARRAYS[kind], (0.3, 0.4, 0.5), (1.5, -2.25, 3.0), TILTED)
    write_volume(volume, tmp_path / "ours.nrrd", compress=compress)
    _sitk_nrrd(volume, tmp_path / "theirs.nrrd", compress)
    ours, theirs = read_volume(tmp_path / "ours.nrrd"), read_volume(tmp_path / "theirs.nrrd")
    expected = ARRAYS[kind].astype(np.uint8) if kind == "bool" else ARRAYS[kind]
    assert ours.array.dtype == theirs.array.dtype == expected.dtype
    assert np.array_equal(ours.array, expected)
    assert np.array_equal(ours.ijk_to_ras, theirs.ijk_to_ras)  # NRRD stores direction x spacing: both round alike
    np.testing.assert_allclose(ours.ijk_to_ras, volume.ijk_to_ras, atol=1e-15)
    # Control: the comparison sees a changed voxel.
    changed = expected.copy()
    changed.flat[17] += 1
    assert not np.array_equal(ours.array, changed)


def test_gzip_file_is_compressed_and_slab_boundaries_do_not_show(tmp_path, monkeypatch):
    import CTXAILib.engine.nrrd as nrrd

    monkeypatch.setattr(nrrd, "_SLAB_BYTES", 1000)  # many slabs of a few slices each
    array = np.zeros((40, 30, 20), np.float32)
    array[10:30, 5:25, 3:17] = RNG.normal(size=(20, 20, 14))
    write_volume(Volume(array), tmp_path / "m.nrrd")
    assert np.array_equal(read_volume(tmp_path / "m.nrrd").array, array)
    assert (tmp_path / "m.nrrd").stat().st_size < array.nbytes / 2


_EMBED_AND_WRITE = """
import sys
import numpy as np
from CTXAILib.engine.geometry import Box, Volume, write_volume
import SimpleITK

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

geometry = Volume(np.broadcast_to(np.float32(0), (512, 512, 256)))
box = Box((100, 100, 100), (132, 132, 132))
sub = geometry.crop(box).with_array(np.ones((32, 32, 32), np.float32))
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to what is resident now
before = status("VmRSS")
full = geometry.embed(sub, box)
write_volume(full, sys.argv[1])
print(status("VmHWM") - before)
"""


def _peak_growth_mib(path) -> float:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", _EMBED_AND_WRITE, str(path)], capture_output=True, text=True,
                          env=env, check=True)
    return float(done.stdout.strip())


def test_zero_padded_map_is_written_without_touching_its_padding(tmp_path):
    """A 256 MiB map that is zero outside a 32³ extent, embedded and written in a fresh process: its peak resident
    memory grows by a small part of the map. Control: SimpleITK's writer (the .mha path) copies all of it."""
    streamed = _peak_growth_mib(tmp_path / "a.nrrd")
    copied = _peak_growth_mib(tmp_path / "a.mha")
    assert streamed < 0.2 * 256, streamed
    assert copied > 0.75 * 256, copied
    assert read_volume(tmp_path / "a.nrrd").array[100:132, 100:132, 100:132].min() == 1.0


def test_read_shares_simpleitks_buffer_and_keeps_it_alive(tmp_path):
    array = RNG.normal(size=(8, 9, 10)).astype(np.float32)
    write_volume(Volume(array), tmp_path / "v.nrrd")
    volume = read_volume(tmp_path / "v.nrrd")
    gc.collect()
    litter = [np.full((64, 64, 64), 7.0, np.float32) for _ in range(8)]  # would reuse a freed buffer
    assert np.array_equal(volume.array, array)
    assert volume.array.flags.writeable
    volume.array[0, 0, 0] = 5.0
    assert volume.array[0, 0, 0] == 5.0 and litter


@pytest.mark.parametrize("fill", [0.0, float("nan")], ids=["zero", "nan"])
@pytest.mark.parametrize("channels", [0, 2], ids=["scalar", "vector"])
def test_placed_volume_is_its_embedding_in_memory_and_on_disk(tmp_path, monkeypatch, fill, channels):
    """A placed volume (a float16 part in a box, ``fill`` elsewhere, float32) reads as the embedding of its part,
    and its streamed file (slab boundaries cutting through the box) holds the same voxels."""
    import CTXAILib.engine.nrrd as nrrd

    monkeypatch.setattr(nrrd, "_SLAB_BYTES", 3 * 12 * 11 * 4 * max(channels, 1))  # three k-slices a slab
    whole = Volume(np.zeros((10, 11, 12), np.float32), (0.3, 0.4, 0.5), (1.0, 2.0, 3.0), TILTED)
    box = Box((2, 3, 4), (9, 8, 8))
    part = RNG.random(((channels,) if channels else ()) + box.shape).astype(np.float16)
    placed = PlacedVolume(whole, part, box, fill=fill)
    assert placed.shape == whole.shape and placed.channels == max(channels, 1) and placed._array is None
    write_volume(placed, tmp_path / "p.nrrd")
    assert placed._array is None  # written from its parts
    expected = whole.embed(whole.crop(box).with_array(part.astype(np.float32)), box, fill=fill)
    np.testing.assert_array_equal(placed.array, expected.array)
    assert placed.array.dtype == np.float32 and np.array_equal(placed.ijk_to_ras, whole.ijk_to_ras)
    back = read_volume(tmp_path / "p.nrrd")
    np.testing.assert_array_equal(back.array, expected.array)
    assert (np.isnan(back.array).sum() == expected.array.size - part.size) == np.isnan(fill)


def test_placed_volume_refuses_a_box_outside_or_a_part_that_does_not_fill_it():
    from CTXAILib.errors import InputError, RegionError

    whole = Volume(np.zeros((4, 4, 4), np.float32))
    with pytest.raises(RegionError, match="reaches outside"):
        PlacedVolume(whole, np.zeros((2, 2, 2)), Box((3, 3, 3), (5, 5, 5)))
    with pytest.raises(InputError, match="does not fill a box"):
        PlacedVolume(whole, np.zeros((2, 2, 3)), Box((0, 0, 0), (2, 2, 2)))
