"""The synthetic CT phantom: exact ground truth, CT-like grey values that agree with it, and readable files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from CTXAILib.errors import InputError
from CTXAILib.engine.geometry import read_volume
from CTXAILib.synthetic.phantom import (
    CT_AIR,
    CT_METAL,
    DEFECT_TYPES,
    PART_KINDS,
    Defect,
    Phantom,
    Scanner,
    generate_phantom,
    save_phantom,
)

CONTRAST = CT_METAL - CT_AIR
REQUESTED = {"pore": 5, "lack_of_fusion": 2, "crack": 2, "inclusion_dense": 2, "inclusion_light": 2}


@pytest.fixture(scope="module")
def default_phantom() -> Phantom:
    return generate_phantom(11, shape=(96, 96, 96))


@pytest.fixture(scope="module")
def requested_phantom() -> Phantom:
    return generate_phantom(4, shape=(96, 96, 96), defect_counts=REQUESTED, part="bracket")


def _clean_regions(p: Phantom, margin: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Air and metal voxels at least ``margin`` voxels from the part surface and from every defect."""
    part = p.part.array
    air = ~ndimage.binary_dilation(part, iterations=margin)
    metal = ndimage.binary_erosion(part, iterations=margin) & ~ndimage.binary_dilation(
        p.instances.array > 0, iterations=margin)
    return air, metal


def _defect_and_shell(p: Phantom, defect: Defect) -> tuple[np.ndarray, np.ndarray]:
    """CT values inside a defect and in the clean metal shell 2-4 voxels around it."""
    region = defect.box.grow(6).clip(p.ct.shape).slices
    mine = p.instances.array[region] == defect.id
    shell = ndimage.binary_dilation(mine, iterations=4) & ~ndimage.binary_dilation(mine, iterations=1)
    shell &= p.part.array[region] & (p.instances.array[region] == 0)
    ct = p.ct.array[region]
    return ct[mine], ct[shell]


# --- Determinism -------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_volumes_and_other_seeds_differ():
    shape = (64, 72, 80)
    a, b = generate_phantom(7, shape), generate_phantom(7, shape)
    for name in ("ct", "labels", "instances", "part"):
        va, vb = getattr(a, name), getattr(b, name)
        assert va.array.dtype == vb.array.dtype and np.array_equal(va.array, vb.array), name
        assert va.same_geometry(vb)
    assert a.defects == b.defects and a.scanner == b.scanner and a.part_kind == b.part_kind
    c = generate_phantom(8, shape)
    assert not np.array_equal(a.ct.array, c.ct.array)
    assert not np.array_equal(a.instances.array, c.instances.array)
    named = generate_phantom(7, shape, part=a.part_kind)  # naming the seed's own part changes nothing
    assert np.array_equal(named.ct.array, a.ct.array)


def test_changing_the_scanner_keeps_the_part_and_the_defects():
    shape = (64, 64, 64)
    a = generate_phantom(3, shape, part="coupon")
    b = generate_phantom(3, shape, part="coupon", scanner=Scanner(photons=1e5))
    assert np.array_equal(a.instances.array, b.instances.array) and a.defects == b.defects
    assert not np.array_equal(a.ct.array, b.ct.array)


# --- Ground truth ------------------------------------------------------------------------------------------------


def test_volumes_share_one_geometry_centred_at_ras_origin(default_phantom):
    p = default_phantom
    assert p.ct.array.dtype == np.float32 and p.labels.array.dtype == np.uint8
    assert p.instances.array.dtype == np.int32 and p.part.array.dtype == np.bool_
    for v in (p.labels, p.instances, p.part):
        assert v.same_geometry(p.ct)
    assert p.ct.shape == (96, 96, 96) and p.ct.spacing == (0.2, 0.2, 0.2)
    far_corner = p.ct.ijk_to_ras @ np.array([95, 95, 95, 1.0])
    np.testing.assert_allclose(far_corner[:3], -np.asarray(p.ct.origin), atol=1e-9)
    assert p.part_kind in PART_KINDS
    assert 0.05 < p.part.array.mean() < 0.6
    border = np.ones(p.part.shape, bool)
    border[3:-3, 3:-3, 3:-3] = False
    assert not p.part.array[border].any()  # air all round the part


def test_default_counts_give_every_type(default_phantom):
    types = Counter(d.type for d in default_phantom.defects)
    assert set(types) == set(DEFECT_TYPES)
    assert 5 <= len(default_phantom.defects) <= 40
    assert set(np.unique(default_phantom.labels.array)) == set(range(len(DEFECT_TYPES) + 1))


def test_requested_counts_are_honoured(requested_phantom):
    assert Counter(d.type for d in requested_phantom.defects) == Counter(REQUESTED)
    only_pores = generate_phantom(5, (64, 64, 64), defect_counts={"pore": 3})
    assert [d.type for d in only_pores.defects] == ["pore"] * 3
    assert set(np.unique(only_pores.labels.array)) == {0, 1}


@pytest.mark.parametrize("which", ["default_phantom", "requested_phantom"])
def test_instances_labels_and_defect_records_agree(which, request):
    p: Phantom = request.getfixturevalue(which)
    labels, instances = p.labels.array, p.instances.array
    assert np.array_equal(labels > 0, instances > 0)
    assert [d.id for d in p.defects] == list(range(1, len(p.defects) + 1))
    assert set(np.unique(instances)) == {0} | {d.id for d in p.defects}
    objects = ndimage.find_objects(instances)
    voxel = float(np.prod(p.ct.spacing))
    for d in p.defects:
        mine = instances == d.id
        assert d.voxel_count == int(mine.sum()) > 0
        assert np.all(labels[mine] == DEFECT_TYPES.index(d.type) + 1)
        k, j, i = objects[d.id - 1]
        assert d.lo == (i.start, j.start, k.start) and d.hi == (i.stop, j.stop, k.stop)
        kji = np.argwhere(mine)
        np.testing.assert_allclose(d.centre, kji.mean(axis=0)[::-1], atol=1e-9)
        assert d.equivalent_diameter_mm == pytest.approx((6 * d.voxel_count * voxel / np.pi) ** (1 / 3))


def test_defect_sizes_vary_and_most_are_detectable(default_phantom):
    sizes = [min(h - l for l, h in zip(d.lo, d.hi)) for d in default_phantom.defects]
    diameters = [d.equivalent_diameter_mm for d in default_phantom.defects]
    assert np.mean(np.array(sizes) >= 3) >= 0.75
    assert max(diameters) > 1.5 * min(diameters)


@pytest.mark.parametrize("which", ["default_phantom", "requested_phantom"])
def test_defects_lie_inside_the_part_and_apart(which, request):
    p: Phantom = request.getfixturevalue(which)
    instances, part = p.instances.array, p.part.array
    ball = ndimage.generate_binary_structure(3, 3)
    for d in p.defects:
        region = d.box.grow(2).clip(p.ct.shape).slices
        grown = ndimage.binary_dilation(instances[region] == d.id, ball)  # one voxel around, diagonals too
        assert np.all(part[region][grown]), f"defect {d.id} ({d.type}) reaches the part surface"
        others = instances[region][grown]
        assert np.all((others == 0) | (others == d.id)), f"defect {d.id} touches another defect"


# --- Grey values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default_phantom", "requested_phantom"])
def test_air_and_metal_sit_on_the_calibrated_scale(which, request):
    p: Phantom = request.getfixturevalue(which)
    air, metal = _clean_regions(p)
    assert abs(p.ct.array[air].mean() - CT_AIR) < 60
    assert abs(p.ct.array[metal].mean() - CT_METAL) < 200


@pytest.mark.parametrize("which", ["default_phantom", "requested_phantom"])
def test_grey_values_agree_with_the_ground_truth(which, request):
    """Each defect against the clean metal around it, as a fraction of the metal-air contrast.

    Defects of fewer than 20 voxels (about 3 across) are blurred by the simulated scan as by a real one, so their
    mean contrast must reach two thirds of the margin only.
    """
    p: Phantom = request.getfixturevalue(which)
    pore_contrasts = []
    for d in p.defects:
        inside, shell = _defect_and_shell(p, d)
        metal, value = float(shell.mean()), float(inside.mean())
        darker = (metal - value) / CONTRAST
        scale = 1.0 if d.voxel_count >= 20 else 2 / 3
        what = f"defect {d.id} ({d.type}, {d.voxel_count} voxels): mean {value:.0f}, metal around {metal:.0f}"
        if d.type in ("pore", "lack_of_fusion"):
            assert darker >= 0.3 * scale, what
            pore_contrasts.append(darker)
        elif d.type == "crack":  # one or two voxels thin
            assert darker >= 0.2 * scale, what
        elif d.type == "inclusion_dense":
            assert -darker >= 0.5, what
        else:  # alumina: between air and metal
            assert value > CT_AIR + 0.25 * CONTRAST and darker >= 0.15 * scale, what
    assert np.mean(pore_contrasts) >= 0.33


# --- The acquisition is simulated ------------------------------------------------------------------------------


def test_noise_is_present_and_plausible(default_phantom):
    _, metal = _clean_regions(default_phantom)
    ct = default_phantom.ct.array
    high_pass = ct - ndimage.uniform_filter(ct, 3)
    noise = float(high_pass[metal].std())
    assert 40 < noise < 0.2 * CONTRAST


def _depth_profile(p: Phantom) -> tuple[float, float]:
    """Mean CT of a plain part near its surface (3-6 voxels deep) and in its middle (the deepest 20 %)."""
    depth = ndimage.distance_transform_edt(p.part.array)
    ct = p.ct.array
    return float(ct[(depth >= 3) & (depth < 6)].mean()), float(ct[depth >= 0.8 * depth.max()].mean())


def test_beam_hardening_makes_cupping_and_its_correction_removes_it():
    shape = (64, 96, 96)
    raw = generate_phantom(2, shape, part="coupon", defect_counts={},
                           scanner=Scanner(bh_correction=0.0, scatter_fraction=0.02))
    edge, middle = _depth_profile(raw)
    assert edge - middle > 0.08 * CONTRAST
    corrected = generate_phantom(2, shape, part="coupon", defect_counts={},
                                 scanner=Scanner(bh_correction=1.0, scatter_fraction=0.0))
    edge, middle = _depth_profile(corrected)
    assert abs(edge - middle) < 0.03 * CONTRAST


def _radial_roughness(p: Phantom) -> float:
    """How much the CT, averaged over rings about the rotation axis, jumps from one radius to the next."""
    nk, nj, ni = p.ct.shape
    jj, ii = np.indices((nj, ni))
    radius = np.round(np.hypot(jj - (nj - 1) / 2, ii - (ni - 1) / 2)).astype(int)
    profile = np.array([p.ct.array[:, radius == r].mean() for r in range(1, min(nj, ni) // 2)])
    return float(np.abs(profile - ndimage.median_filter(profile, 5)).mean())


def test_detector_gain_errors_make_rings():
    shape = (48, 96, 96)
    clean = generate_phantom(5, shape, part="coupon", defect_counts={}, scanner=Scanner(ring_gain_std=0.0))
    ringed = generate_phantom(5, shape, part="coupon", defect_counts={}, scanner=Scanner(ring_gain_std=0.005))
    assert _radial_roughness(ringed) > 3 * _radial_roughness(clean)


def test_dense_inclusions_cast_streaks():
    p = generate_phantom(1, (96, 96, 96), part="coupon", defect_counts={"inclusion_dense": 1, "pore": 1})
    inclusion = next(d for d in p.defects if d.type == "inclusion_dense")
    i, j, k = (int(round(c)) for c in inclusion.centre)
    _, metal = _clean_regions(p)
    jj, ii = np.indices(p.ct.shape[1:])
    ring = (np.hypot(jj - j, ii - i) >= 4) & (np.hypot(jj - j, ii - i) < 14)
    near = p.ct.array[k][ring & metal[k]].std()
    away = [p.ct.array[kk][ring & metal[kk]].std() for kk in (k - 15, k + 15)]
    assert near > 1.5 * max(away)


# --- Files ------------------------------------------------------------------------------------------------------


def test_save_phantom_writes_readable_files(default_phantom, tmp_path):
    p = default_phantom
    paths = save_phantom(p, tmp_path / "demo")
    assert set(paths) == {"ct", "labels", "colours", "instances", "part", "defects"}
    assert {q.name for q in paths.values()} == {"ct.nrrd", "gt_labels.nrrd", "gt_labels.ctbl", "gt_instances.nrrd",
                                                "gt_part.nrrd", "defects.json"}
    assert sorted(q.name for q in (tmp_path / "demo").iterdir()) == sorted(q.name for q in paths.values())
    for role, original in (("ct", p.ct), ("labels", p.labels), ("instances", p.instances), ("part", p.part)):
        back = read_volume(paths[role])
        assert back.same_geometry(original), role
        assert np.array_equal(back.array, original.array.astype(back.array.dtype)), role
    assert read_volume(paths["labels"]).array.dtype == np.uint8
    assert read_volume(paths["instances"]).array.dtype == np.int32

    rows = [line.split() for line in paths["colours"].read_text().splitlines() if not line.startswith("#")]
    assert [(int(r[0]), r[1]) for r in rows] == list(enumerate(("background",) + DEFECT_TYPES))
    assert all(len(r) == 6 and all(0 <= int(c) <= 255 for c in r[2:]) for r in rows)

    meta = json.loads(paths["defects"].read_text())
    assert meta["seed"] == p.seed and meta["shape_kji"] == list(p.ct.shape)
    assert meta["spacing_mm_ijk"] == list(p.ct.spacing) and meta["defect_types"] == list(DEFECT_TYPES)
    assert [d["id"] for d in meta["defects"]] == [d.id for d in p.defects]
    assert meta["defects"][0]["lo"] == list(p.defects[0].lo)


def test_a_failed_save_leaves_no_partial_file(default_phantom, tmp_path, monkeypatch):
    original_write = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        original_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError):
        save_phantom(default_phantom, tmp_path)
    left = {q.name for q in tmp_path.iterdir()}
    assert "gt_labels.ctbl" not in left and "defects.json" not in left
    assert not any(name.startswith(".") for name in left)  # no temporary file either


# --- Arguments --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"shape": (16, 96, 96)},
    {"shape": (96, 96)},
    {"spacing_mm": (0.2, 0.2, 0.0)},
    {"spacing_mm": (0.1, 0.1, 0.9)},
    {"defect_counts": {"void": 2}},
    {"defect_counts": {"pore": -1}},
    {"part": "teapot"},
])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(InputError):
        generate_phantom(0, **kwargs)


def test_bad_scanner_settings_are_refused():
    with pytest.raises(InputError, match="kvp"):
        Scanner(kvp=1000.0)


def test_too_many_defects_for_the_part_are_refused():
    with pytest.raises(InputError, match="fewer defects"):
        generate_phantom(0, (48, 48, 48), part="flange", defect_counts={"lack_of_fusion": 60})
